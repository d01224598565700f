"""Pretraining: ``upcli pretrain itpn`` (HiViT + feature pyramid). MZSR's meta-learned start lives in ``upcli.sr``."""
