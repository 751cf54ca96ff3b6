"""Self-supervised pretraining of a backbone's encoder on every CT volume of a cohort: the CT is
plentiful, the labels are few.

``python -m xpression.pretrain [data=...] [model=...] [patch.size_um=...] [pretrain.steps=...]``
draws patches at random points inside each volume's tissue mask (no sections, no labels), trains
the backbone by masked-volume reconstruction (:mod:`xpression.models.masked`) and writes
``encoder.ckpt`` into its run folder; ``python train.py model=<same> model.init_from=<it>`` then
fine-tunes on the sections. See conf/pretrain.yaml.
"""

from xpression.pretrain.run import pretrain

__all__ = ["pretrain"]
