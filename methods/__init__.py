"""Methods, one file each, registered by name on import."""
from methods import (fixmatch, flexmatch, freematch, mae_finetune, mae_pretrain, semi_mae, semi_vit,  # noqa: F401
                     ssmae, supervised)
