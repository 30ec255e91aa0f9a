"""Methods, one file each, registered by name on import."""
from methods import fixmatch, mae_finetune, mae_pretrain, semi_mae, semi_vit, ssmae, supervised  # noqa: F401
