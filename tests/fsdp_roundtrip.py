"""Run by test_distributed under torchrun (2 processes, gloo): a tiny Qwen2 + LoRA sharded with
torch's FSDP2, its adapter saved the way the Trainer saves a sharded model (the full state dict
gathered, then peft's save_pretrained), loaded back with plain peft on an unsharded base."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from gluetune.config.run import load_config
from gluetune.model import classifier as models

ROOT = Path(__file__).resolve().parents[1]


def build(model_dir: Path):
    config = load_config(ROOT / "configs" / "glue_cola_qwen.yaml", [f"model.name_or_path={model_dir}", "peft.lora_dropout=0"])
    tokenizer = models.load_tokenizer(config.model)
    torch.manual_seed(0)
    return config, tokenizer, models.load_classifier(config.model, config.task, tokenizer.pad_token_id)


def main(model_dir: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config, tokenizer, base = build(model_dir)
    model = models.make_trainable(base, config).eval()
    with torch.no_grad():  # trained-looking adapters (LoRA B starts at zero), the same on both processes
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.1)
    batch = tokenizer(["A short one.", "A rather longer sentence than that."], padding=True, return_tensors="pt")
    with torch.no_grad():
        unsharded = model(**batch).logits
    for module in model.modules():
        if type(module).__name__ == "Qwen2DecoderLayer":
            fully_shard(module)
    fully_shard(model)
    assert any(type(p).__name__ == "DTensor" for p in model.parameters()), "the model is not sharded"
    with torch.no_grad():
        sharded = model(**batch).logits
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(str(out / "adapter"), state_dict=state)
        from peft import PeftModel

        _, _, fresh = build(model_dir)
        reloaded = PeftModel.from_pretrained(fresh, str(out / "adapter")).eval()
        with torch.no_grad():
            again = reloaded(**batch).logits
        torch.testing.assert_close(sharded, unsharded, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again, unsharded, rtol=1e-5, atol=1e-5)
        print("ROUNDTRIP OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
