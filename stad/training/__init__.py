"""Training runs: teacher pretraining (:mod:`~stad.training.teacher`, with its losses and
distillation targets) and student fitting (:mod:`~stad.training.students`), and the
checkpointed-run skeleton they share (:mod:`~stad.training.checkpoint`)."""
