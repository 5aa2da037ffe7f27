"""refrag.train: the thin SFT loop, atomic checkpoints, DDP / FSDP2 shims.

    python -m refrag.train sft --config refrag/train/configs/demo.json [--key value ...]
    torchrun --standalone --nproc_per_node=8 -m refrag.train sft --config refrag/train/configs/d20.json

    from refrag.train.config import TrainConfig, load_config     # validated keys, JSON + overrides
    from refrag.train.sft import train_sft                        # the step loop (any loader / model)
    from refrag.train.checkpoint import save_checkpoint, load_checkpoint, latest_checkpoint
    from refrag.train.__main__ import run_sft                     # data + model from a config, then train_sft

Modules: config (TrainConfig), optim (AdamW groups, warmup + cosine), shims (process group,
device, autocast, NVTX, memory), checkpoint (atomic save, verified load, RNG capture),
data (tokenizer, retrieval conversations, packed loaders), sft (the loop).
"""
