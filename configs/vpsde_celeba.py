"""VP SDE on CelebA 64x64 with a continuous DDPM++ network.

    python main.py --config=configs/vpsde_celeba.py --workdir=runs/vpsde_celeba --mode=train
    python main.py --config=configs/vpsde_celeba.py --workdir=runs/vpsde_celeba --mode=sample

Data: tfds ``celeb_a`` prepared as ArrayRecord (``scripts/prepare_data.py --dataset=celeb_a``),
preprocessed as score_sde does: central 140x140 crop of the aligned 218x178 image, bilinear
anti-aliased resize to 64x64, random horizontal flips. score_sde released no CelebA
checkpoint (and the DEIS paper's CelebA numbers use a discrete-time PyTorch DDIM/PNDM model),
so this architecture is our choice: DDPM++ blocks with DDIM's CelebA-64 layout -- nf 128,
ch_mult (1, 2, 2, 2, 4), 2 residual blocks per level, attention at 16x16, dropout 0.1 -- and
score_sde's VP training recipe (Adam 2e-4, batch 128, EMA 0.9999). Needs accelerators; the
sampler writes ``<workdir>/samples/tab3_nfe10_quadratic/{samples.npz,samples.png}``.
"""

from configs.default import get_default_config, model_block
from configs.tables import add_table_fields


def get_config():
    config = get_default_config()
    config.model = model_block(
        "vp_cifar10_ddpmpp_continuous",
        ch_mult=(1, 2, 2, 2, 4),
        num_res_blocks=2,
        attn_resolutions=(16,),
    )
    config.data.name = "celeb_a"
    config.data.image_size = 64
    config.data.centered = True
    config.training.reduce_mean = True
    config.training.n_iters = 1_300_001
    return add_table_fields(config)  # --mode=table fields (configs/tables.py)
