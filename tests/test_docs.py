"""Every `stad` command shown in README.md, docs/ and the example plugin's README runs.

The commands are read from the ```bash blocks of those files and run as written through the
CLI, in order (a documented session builds on its earlier steps), inside a temporary folder
where the documented paths exist. Flags that only shrink the work (fewer iterations, epochs,
scales, smaller images) are appended, so that the whole session takes seconds; a flag given
twice takes its last value. The TOML example in docs/usage.md must validate.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from stad.cli import app
from stad.config import resolve_settings
from stad.datasets.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        REPO / "plugins" / "stad-btad" / "README.md"]

SHRINK = {
    "pretrain-teacher": ["--patch-sizes", "17", "--iterations", "2"],
    "fit-students": ["--patch-sizes", "17", "--epochs", "1", "--min-steps", "0",
                     "--image-size", "32", "--students", "2"],
    "inspect-teacher": ["--patch-sizes", "17", "--patches", "16"],
}
ENV = {"STAD_TEACHER__IMAGE_SIZE": "32", "STAD_TEACHER__BATCH_SIZE": "8",
       "STAD_TEACHER__BUFFER_IMAGES": "4"}  # 6 training images: the streamed path


def _shrink(args: list[str]) -> list[str]:
    """SHRINK's flags for a command; but a documented ``fit-students`` of one scale keeps its
    scale (a session that fits the scales separately and merges them depends on it)."""
    shrink = SHRINK.get(args[0], [])
    given = args[args.index("--patch-sizes") + 1] if "--patch-sizes" in args[:-1] else ""
    if args[0] == "fit-students" and given.isdigit():
        i = shrink.index("--patch-sizes")
        shrink = shrink[:i] + shrink[i + 2:]
    return shrink


def documented_commands(path: Path) -> list[str]:
    """`stad ...` lines of the ```bash blocks of a Markdown file, continuations joined."""
    text = path.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#", line)[0].strip()
            if line.startswith("stad "):
                commands.append(line)
    return commands


def test_docs_show_the_typical_session():
    commands = [c.split()[1] for c in documented_commands(REPO / "README.md")]
    for step in ("pretrain-teacher", "fit-students", "calibrate", "score", "evaluate"):
        assert step in commands


def _world(tmp: Path) -> dict[str, str]:
    """Folders the documented commands refer to, and what each placeholder becomes."""
    mvtec = tmp / "mvtec"
    generate(tmp / "gen", categories=["grain"], image_size=32, n_train=6, n_val=0,
             n_test_good=2, n_test_per_defect=1, seed=2)
    shutil.copytree(tmp / "gen" / "grain", mvtec / "bottle")
    shutil.copytree(tmp / "gen" / "grain", mvtec / "carpet")  # usage.md's texture example
    incoming = tmp / "incoming"
    incoming.mkdir()
    for src in sorted((mvtec / "bottle" / "test").rglob("*.png"))[:3]:
        shutil.copy(src, incoming / f"{src.parent.name}_{src.name}")
    btad = tmp / "btad" / "01"
    for sub in ("train/ok", "test/ok", "test/ko", "ground_truth/ko"):
        (btad / sub).mkdir(parents=True)
    for i, src in enumerate(sorted((mvtec / "bottle" / "train" / "good").glob("*.png"))):
        Image.open(src).save(btad / "train" / "ok" / f"{i:04d}.bmp")
    Image.open(src).save(btad / "test" / "ok" / "0000.bmp")
    defect = sorted((mvtec / "bottle" / "test" / "hole").glob("*.png"))[0]
    Image.open(defect).save(btad / "test" / "ko" / "0000.bmp")
    Image.open(mvtec / "bottle" / "ground_truth" / "hole" / f"{defect.stem}_mask.png").save(
        btad / "ground_truth" / "ko" / "0000.png")
    photos = tmp / "photos" / "n01"
    photos.mkdir(parents=True)
    for src in sorted((mvtec / "bottle" / "train" / "good").glob("*.png")):
        shutil.copy(src, photos / src.name)
    (tmp / "photos.txt").write_text("".join(f"photos/n01/{p.name}\n"
                                            for p in sorted(photos.iterdir())))
    return {"/data/mvtec": str(mvtec), "PATH": str(tmp / "btad"),
            "/data/photos": str(tmp / "photos"), "photos.txt": str(tmp / "photos.txt"),
            # usage.md's texture model (fitted on `carpet` at 256², then calibrated with
            # --tta): README's model file stands in for it, so that fit writes over it
            "carpet.safetensors": "bottle.safetensors"}


@pytest.mark.slow
def test_every_documented_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    places = _world(tmp_path)
    runner = CliRunner()
    ran = []
    for doc in DOCS:
        for command in documented_commands(doc):
            args = shlex.split(command)[1:]
            args = [places.get(a, a) for a in args]
            args += _shrink(args)
            result = runner.invoke(app, args, env=ENV)
            assert result.exit_code in (0, 10), (doc.name, command, result.output,
                                                 result.exception)
            ran.append(args[0])
    assert {"pretrain-teacher", "fit-students", "merge-models", "calibrate", "score",
            "evaluate", "datasets"} <= set(ran)
    assert (tmp_path / "bottle-report" / "report.html").is_file()


def test_usage_toml_example_validates(tmp_path: Path):
    text = (REPO / "docs" / "usage.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    config = tmp_path / "stad.toml"
    config.write_text(block, encoding="utf-8")
    settings = resolve_settings({}, config_file=config, environ={})
    assert settings.students.val_fraction == 0.1 and settings.teacher.iterations == 50000
    # The block is introduced as "the defaults below": every key it sets is the default,
    # but for the two that show where a user's data would be (no default there).
    documented = settings.model_dump()
    defaults = resolve_settings({}, config_file=None, environ={}).model_dump()
    assert (str(documented.pop("root")), documented.pop("category")) == ("/data/mvtec", "bottle")
    assert (defaults.pop("root"), defaults.pop("category")) == (None, None)
    assert documented == defaults


def test_makefile_targets_match_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile,
                                                                    flags=re.M)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci


def documented_benchmark_commands() -> list[tuple[str, str]]:
    """(file, command) for each `python benchmarks/NAME.py ...` line of a fenced block in
    README.md and docs/, continuations joined, cut at a redirection or pipe."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.split(r"\s#|\s[|>]|\s2>|\s&&", line)[0].strip()
                line = re.sub(r"^(\S+=\S+\s+)+", "", line)  # VAR=value in front
                line = re.sub(r"\s\[[^\]]*\]", "", line)  # [--optional parts] left out
                line = re.sub(r"^\S*/bin/python ", "python ", line)  # .venv/bin/python
                if line.startswith("python benchmarks/"):
                    found.append((doc.name, line))
    return found


def test_every_documented_benchmark_command_parses(monkeypatch: pytest.MonkeyPatch):
    # The benchmarks take minutes to hours, so each command line shown is parsed by its
    # script's own parser (options renamed or dropped since are caught), not run.
    import argparse
    import importlib.util
    import sys

    class Parsed(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        real(self, args, namespace)  # exits 2 on an unknown option or a bad value
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    commands = documented_benchmark_commands()
    assert len(commands) >= 50, "the docs lost their benchmark commands"
    modules, failed = {}, []
    for doc, command in commands:
        script, *argv = shlex.split(command)[1:]
        if script not in modules:
            name = f"_documented_{Path(script).stem}"
            spec = importlib.util.spec_from_file_location(name, REPO / script)
            assert spec is not None and spec.loader is not None, (doc, command)
            modules[script] = importlib.util.module_from_spec(spec)
            monkeypatch.setitem(sys.modules, name, modules[script])  # for its dataclasses
            spec.loader.exec_module(modules[script])
        module = modules[script]
        monkeypatch.setattr(sys, "argv", [script, *argv])
        try:
            module.main(argv) if module.main.__code__.co_argcount else module.main()
            failed.append(f"{doc}: `{command}` ran without parsing its arguments")
        except Parsed:
            pass
        except SystemExit as exc:
            failed.append(f"{doc}: `{command}` does not parse (exit {exc.code})")
    assert not failed, "\n".join(failed)


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped,
    spaces as hyphens, a repeated heading numbered -1, -2, ..."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.replace("`", ""))
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_links_between_the_docs_reach_their_file_and_heading():
    broken = []
    for doc in [*DOCS, REPO / "CHANGELOG.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists() or (anchor and dest.suffix == ".md"
                                     and anchor not in _anchors(dest)):
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, broken
