"""What each CLI verb does, on top of the library: select the data, run the step, write the
artifact. Each function takes validated :class:`~stad.config.Settings` and returns what the
command prints; :mod:`stad.cli` only parses options, and :mod:`stad.api` offers the same steps
with keyword settings.

- :mod:`~stad.commands.train`: ``pretrain-teacher``, ``inspect-teacher``, ``fit-students``;
- :mod:`~stad.commands.merge`: ``merge-models``;
- :mod:`~stad.commands.calibrate`, :mod:`~stad.commands.score`,
  :mod:`~stad.commands.evaluate`, :mod:`~stad.commands.export`, :mod:`~stad.commands.demo`;
- :mod:`~stad.commands.common`: what several of them share (model loading, data defaults).
"""
