"""``stad export``: a calibrated model as one ONNX graph, and scoring with onnxruntime.

The graph maps a batch of preprocessed images, (N, 3, S, S) float32 (each image resized to the
model's S × S, bilinear with antialiasing, and standardized with the recorded mean and std:
``metadata["preprocessing"]``), to

- ``fused``: (N, S, S), the fused anomaly map at the model's resolution, and
- ``scales``: (N, K, S, S), each scale's map (their names in ``metadata["scales"]``),

with the teachers, the students, the descriptor normalization, the calibration statistics
(global or per position) and the fusion inside: exactly :meth:`stad.model.Networks.maps` in
fp32. The batch dimension is dynamic. The metadata (``onnx.ModelProto.metadata_props``) also
holds the image and pixel thresholds, the image-score rule and the stad version.

Images of another size get their map resized back to their own size, and their score taken
on it, outside the graph: :class:`OnnxNetworks` does that exactly as the PyTorch path does, so
``stad score --model model.onnx`` and ``stad.load_model("model.onnx")`` give the same records.
Needs the ``onnx`` extra (``pip install 'stad[onnx]'``: onnx and onnxruntime).

``quantize="int8"`` (``stad export --quantize int8``) stores every convolution of the teachers
and students as int8 (weights per output channel, activations per tensor, their ranges set on
anomaly-free calibration images by onnxruntime's static quantization; QDQ format); the
normalization, the error and variance, the calibration statistics and the fusion stay fp32.
onnxruntime runs such convolutions with integer dot-product instructions where the CPU has
them (AVX-512 VNNI, AVX-VNNI). What it costs in accuracy and gains in speed is measured in
docs/benchmarks.md ("ONNX export").
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stad._version import __version__
from stad.errors import ArtifactError, StadError, UsageError
from stad.fsutil import atomic_write_bytes, check_output_file, read_regular_file
from stad.images import check_preprocessing
from stad.model import TTA, Inference, Networks, parse_scale_name

OPSET = 17
EXTRA = "pip install 'stad[onnx]'"
QUANTIZATIONS = ("int8",)


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise UsageError(f"ONNX export and scoring need {module}: {EXTRA}") from None


class _Graph(nn.Module):
    """What is exported: standardized images → (fused map, per-scale maps)."""

    def __init__(self, networks: Networks) -> None:
        super().__init__()
        self.networks = networks
        # Registered so that export sees them as the graph's weights.
        self.modules_ = nn.ModuleList(
            [m for s in networks.scales.values() for m in (s.teacher, *s.students)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.networks.maps(x)
        return maps["fused"], torch.stack([maps[k] for k in self.networks.scale_names], 1)


def export_onnx(model: Any, out: Path, *, quantize: str | None = None,
                calibration_images: Sequence[Any] = ()) -> dict[str, Any]:
    """Write ``model`` (a calibrated :class:`stad.api.Model`) to ``out`` as ONNX, atomically;
    with ``quantize="int8"`` its convolutions in int8, their activation ranges measured on
    ``calibration_images`` (anomaly-free images: paths, arrays or PIL images).

    Returns what ``stad export`` prints: the file, its size, the patch sizes and the metadata.
    """
    onnx = _require("onnx")
    check_export_path(out, model.path)
    check_quantize(quantize)
    if quantize is not None and not calibration_images:
        raise UsageError("int8 quantization needs anomaly-free calibration images to set the "
                         "activation ranges; none were given")
    if quantize is None and calibration_images:
        raise UsageError("calibration images set the activation ranges of an int8 export; "
                         "give quantize='int8' with them, or leave them out")
    calibration, _ = model.score_rule()
    networks: Networks = model.networks
    saved = networks.inference
    networks.inference = Inference(batch_size=1)  # exact fp32, untiled, unfused
    size = int(networks.preprocessing["image_size"])
    graph = _Graph(networks.to("cpu").eval()).eval()
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter warns that it is deprecated, and tracing warns about
            # shape checks that are constant for a fixed input size.
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter (``dynamo=False`` where torch has the choice):
            # the dynamo one needs onnxscript.
            extra = ({"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export)
                     .parameters else {})
            torch.onnx.export(graph, (torch.zeros(1, 3, size, size),), buf, **extra,
                              input_names=["images"], output_names=["fused", "scales"],
                              dynamic_axes={"images": {0: "n"}, "fused": {0: "n"},
                                            "scales": {0: "n"}},
                              opset_version=OPSET)
    finally:
        networks.inference = saved
        networks.to(model.device)
    proto = onnx.load_from_string(buf.getvalue())
    quantization = None
    if quantize is not None:
        proto, quantization = _quantize_int8(proto, graph, calibration_images)
    metadata = {
        "stad_version": __version__,
        "preprocessing": json.dumps(networks.preprocessing),
        "patch_sizes": json.dumps(networks.patch_sizes),
        "scales": json.dumps(networks.scale_names),
        "calibration": json.dumps({**{k: calibration.get(k) for k in (
            "threshold", "pixel_threshold", "image_score", "topk_fraction", "normalize",
            "smooth_sigma", "method", "target_fpr", "target_pixel_fpr")},
            # what the graph computes (1 for calibrations made before the setting)
            "variance_weight": networks.variance_weight, "tta": networks.tta}),
        "data": json.dumps({k: v for k, v in model.info.get("data", {}).items()
                            if k in ("dataset", "root", "category")}),
        "input": "images: (N, 3, S, S) float32, resized to S x S and standardized as "
                 "preprocessing says",
        "outputs": "fused: (N, S, S) fused anomaly map; scales: (N, K, S, S) per scale",
        "quantization": json.dumps(quantization),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"stad.{key}", value
    proto.producer_name = "stad"
    data = proto.SerializeToString()
    atomic_write_bytes(out, data)
    return {"artifact": str(out), "format": "onnx", "bytes": len(data), "opset": OPSET,
            "patch_sizes": networks.patch_sizes, "scales": networks.scale_names,
            "image_size": size,
            "threshold": calibration["threshold"],
            "pixel_threshold": calibration.get("pixel_threshold"), "quantization": quantization}


def _quantize_int8(proto: Any, graph: _Graph, images: Sequence[Any]
                   ) -> tuple[Any, dict[str, Any]]:
    """``proto`` with its convolutions quantized to int8 (QDQ), the activation ranges taken
    (min to max) over ``images``; and what the metadata records of it."""
    networks = graph.networks
    onnx = _require("onnx")
    _require("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from stad.scoring import prepare

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        """One image at a time, read when asked for."""

        def __init__(self) -> None:
            self.items = iter(enumerate(images))

        def get_next(self) -> dict[str, Any] | None:
            item = next(self.items, None)
            if item is None:
                return None
            i, image = item
            return {"images": prepare(image, networks, f"calibration image {i}")[0][None]
                    .numpy()}

    # Each network's last convolution (the descriptor: what the error and the variance
    # compare) stays fp32; it is a sixth to a third of a network's work. Its weight is named
    # after the module that _Graph registers: modules_.<network>.convs.<layer>.weight. The
    # graph runs every network once per view of calibrate.tta.
    last = {f"modules_.{i}.convs.{len(net.convs) - 1}.weight"
            for i, net in enumerate(graph.modules_)}
    kept = [n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in last]
    keep = [n.name for n in kept]
    expected = len(last) * len(TTA[networks.tta])
    if {n.input[1] for n in kept} != last or len(keep) != expected:
        # an exporter that names weights otherwise: say so, not guess
        raise StadError(f"int8 export found {len(keep)} of the {expected} descriptor "
                        "convolutions by name; please report it with your torch version")
    with tempfile.TemporaryDirectory(prefix="stad-quantize-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, str(src))
        # onnxruntime's quantizer logs advice to the root logger; not for stad's users.
        disabled = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv"], nodes_to_exclude=keep,
                            per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            # (min-max calibration keeps only each tensor's min and max
                            # per image, not the activations)
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            logging.disable(disabled)
        quantized = onnx.load(str(dst))
    del quantized.metadata_props[:]  # the float graph's own entries are added again
    return quantized, {"type": "int8", "format": "QDQ", "weights": "int8 per output channel",
                       "activations": "uint8 per tensor, min-max", "ops": ["Conv"],
                       "fp32": "each network's last convolution (the descriptor)",
                       "calibration_images": len(images)}


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UsageError(f"--quantize must be {' or '.join(QUANTIZATIONS)}, not {quantize!r}")


def check_format(format: str) -> None:
    """``--format`` must be onnx, and the packages that export need installed (checked before
    ``--out``'s folder is made)."""
    if format != "onnx":
        raise UsageError(f"--format must be onnx, not {format!r} (TorchScript is deprecated in "
                         "PyTorch; docs/usage.md, \"Export\")")
    _require("onnx")


def check_export_path(out: Path, model_path: Path | None) -> None:
    """``--out`` must be a new ``.onnx`` file (scoring tells models apart by the suffix), not
    the model itself; its folder is made when it is written."""
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"the export {out} (--out, out=) must end in .onnx (stad score and "
                         "load_model read exported models by that suffix)")
    check_output_file(out, inputs={"--model": model_path})


@dataclass
class OnnxNetworks:
    """An exported graph in onnxruntime, in the place of :class:`stad.model.Networks` for the
    scoring code (:func:`stad.scoring.iter_results` needs ``preprocessing``, ``inference``,
    ``scale_names`` and ``maps``)."""

    session: Any
    preprocessing: dict[str, Any]
    scale_names: list[str]
    inference: Inference = field(default_factory=Inference)
    source: str = "the ONNX model"  # its file, for errors

    @property
    def patch_sizes(self) -> list[int]:
        return sorted({parse_scale_name(k)[0] for k in self.scale_names})

    def maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        try:
            fused, scales = self.session.run(None, {"images": x.detach().cpu().numpy()})
        except Exception as exc:  # a graph is a program: it can fail, or ask for any memory
            raise ArtifactError(f"{self.source} failed while scoring: "
                                f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]}"
                                ) from None
        out = {name: torch.from_numpy(scales[:, k]) for k, name in enumerate(self.scale_names)}
        out["fused"] = torch.from_numpy(fused)
        return out

    def to(self, device: Any) -> OnnxNetworks:
        return self

    def eval(self) -> OnnxNetworks:
        return self


def _refuse_external_data(data: bytes, path: Path) -> None:
    """Refuse a graph any of whose tensors (initializers, attributes, sub-graphs, functions)
    points at data in another file: onnxruntime would read that file, relative to the current
    folder, into the maps. stad's exports hold all their data in the one file."""
    onnx = _require("onnx")
    try:
        model = onnx.load_model_from_string(data)  # never reads external data itself
    except Exception as exc:  # protobuf's DecodeError and kin
        raise ArtifactError(f"{path} is not a readable ONNX model: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
                            ) from None
    stack: list[Any] = [model]  # every message in the model, without recursion (depth is free)
    while stack:
        message = stack.pop()
        if isinstance(message, onnx.TensorProto) and (
                message.data_location == onnx.TensorProto.EXTERNAL or message.external_data):
            raise ArtifactError(f"{path} keeps tensor {message.name!r} in another file; stad "
                                "reads only self-contained ONNX models (as `stad export` writes)")
        for descriptor, value in message.ListFields():
            if descriptor.type != descriptor.TYPE_MESSAGE:
                continue
            items = [value] if hasattr(value, "ListFields") else value  # one, or repeated
            stack.extend(v for v in items if hasattr(v, "ListFields"))


def load_onnx(path: Path, *, threads: int | None = None) -> tuple[OnnxNetworks, dict[str, Any]]:
    """An exported model: the networks for scoring, and the info its metadata holds
    (``calibration``, ``data``)."""
    try:
        data = read_regular_file(path)
    except FileNotFoundError:  # as a missing .safetensors artifact
        raise ArtifactError(f"model {path} does not exist") from None
    except OSError as exc:
        raise ArtifactError(f"model {path} cannot be read: {exc.strerror}") from None
    if data[8:9] == b"{":  # a safetensors header (its length, then JSON), never an ONNX graph
        raise ArtifactError(f"{path} is a .safetensors artifact under a .onnx name (stad reads "
                            ".onnx files as exported models): rename it to .safetensors")
    ort = _require("onnxruntime")
    _refuse_external_data(data, path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        # Exports made before scales at other sizes name only their patch sizes.
        names = (json.loads(meta["stad.scales"]) if "stad.scales" in meta
                 else [f"p{p}" for p in json.loads(meta["stad.patch_sizes"])])
        k = session.get_outputs()[1].shape[1]
        if isinstance(k, int) and k != len(names):
            raise ValueError(f"its metadata names {len(names)} scales, its graph gives {k}")
        networks = OnnxNetworks(session, check_preprocessing(
            json.loads(meta["stad.preprocessing"]), str(path)), names, source=str(path))
        info = {"calibration": json.loads(meta["stad.calibration"]),
                "data": json.loads(meta.get("stad.data", "{}")), "onnx": str(path)}
    except StadError:
        raise
    except (KeyError, ValueError) as exc:
        raise ArtifactError(f"{path} is not an ONNX model exported by stad ({exc})") from None
    except Exception as exc:  # onnxruntime raises its own exception types on a bad file
        raise ArtifactError(f"{path} is not a readable ONNX model: "
                            f"{str(exc).splitlines()[0][:200]}") from None
    return networks, info
