"""--prior_preservation_mode base_output across processes: two DDP processes of one row each compute the same LoRA
gradient as one process with both rows (each row's prior states chosen by its place in the effective batch, the
instance and prior rows in one DDP forward, their means averaged by DDP's all-reduce as one process's batch mean)."""
import os
import sys

import pytest
import torch

from conftest import ROOT, run_script

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = 2  # the effective batch: one process with 2 rows, or 2 processes with 1 row each


def lora_gradients(rank=0, world=1, accelerator=None):
    """The LoRA gradients of one base_output training step on rows [rank::world] of a fixed 2-row batch, with the
    noise and timesteps each row gets drawn as for the whole batch, so the split is the only difference."""
    from argparse import Namespace

    import make_tiny_model
    from dreambooth import families, models, training
    from dreambooth.families import PromptEncoder
    torch.manual_seed(0)
    pipe = make_tiny_model.build_tiny_pipeline()
    family = families.family_of_pipeline(pipe).from_pipeline(pipe)
    family.freeze()
    models.add_lora(family.denoiser, family.text_encoders, Namespace(
        rank=4, lora_alpha=None, lora_dropout=0.0, use_dora=False, train_text_encoder=False,
        lora_target_modules=family.default_lora_targets))
    for name, p in family.denoiser.named_parameters():  # a LoRA that has moved: the prior rows cost something
        if "lora_B" in name:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    prompts = PromptEncoder(family, ["a photo of sks dog", "a photo of sks dog on grass", "a photo of dog", ""])
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(ROWS, 4, 8, 8, generator=g)
    mine = slice(rank, rank + 1) if world > 1 else slice(0, ROWS)
    batch = {"images": latents[mine], "prompt_ids": torch.tensor([0, 1])[mine],
             "original_sizes": torch.tensor([[64, 64]] * ROWS)[mine],
             "crop_top_lefts": torch.zeros(ROWS, 2, dtype=torch.long)[mine],
             "target_sizes": torch.tensor([[64, 64]] * ROWS)[mine]}
    family.encode_images = lambda images, dtype: images  # the rows are latents already: no VAE sampling
    objective = family.objective()
    draw, calls = objective.noise, [0]

    local = len(range(ROWS)[mine])

    def noise(rows, **kw):  # each draw made for the whole batch (seeded per call), this process's rows kept
        calls[0] += 1
        torch.manual_seed(100 + calls[0])
        copies = rows.shape[0] // local  # the batch once, or more often if the prior rows draw their own noise
        keep = torch.cat([torch.arange(ROWS)[mine] + j * ROWS for j in range(copies)])
        full = torch.zeros((copies * ROWS,) + rows.shape[1:])
        full[keep] = rows
        n = draw(full, **kw)
        return type(n)(*[None if v is None else v[keep] for v in (n.noisy, n.timesteps, n.target, n.weights,
                                                                   n.sigmas)])
    objective.noise = noise
    denoiser = accelerator.prepare(family.denoiser) if accelerator else family.denoiser
    # the prior: 4 states with the base's predictions there under the class and the empty prompt; each row takes
    # the state of its place in the effective batch (base_prior.positions), as the trainer numbers them
    from dreambooth import base_prior
    g = torch.Generator().manual_seed(4)
    bank = base_prior.BasePrior(torch.randn(4, 4, 8, 8, generator=g), torch.tensor([900, 600, 300, 50]),
                                torch.full((4,), 2), torch.randn(4, 4, 8, 8, generator=g),
                                torch.randn(4, 4, 8, 8, generator=g), 3, seed=0,
                                extras=lambda n: {"original_sizes": torch.tensor([[64, 64]] * n),
                                                  "crop_top_lefts": torch.zeros(n, 2, dtype=torch.long),
                                                  "target_sizes": torch.tensor([[64, 64]] * n)})
    where = base_prior.positions(0, 0, 1, rank, world, local, local)
    loss = training.training_loss(family, denoiser, objective, prompts, batch, 1.0, device="cpu",
                                  weight_dtype=torch.float32, cached_latents=False, with_class_images=False,
                                  prior_rows=bank.rows(where, "cpu", torch.float32))
    (accelerator.backward if accelerator else torch.Tensor.backward)(loss)
    return {n: p.grad.clone() for n, p in family.denoiser.named_parameters() if "lora_" in n}


DDP_SCRIPT = """
import os, sys
sys.path[:0] = [{tests!r}, {root!r}, {examples!r}]
import torch
from accelerate import Accelerator
from test_base_output import lora_gradients
accelerator = Accelerator(cpu=True)
assert accelerator.num_processes == 2, accelerator.num_processes
grads = lora_gradients(accelerator.process_index, accelerator.num_processes, accelerator)
torch.save(grads, os.path.join({out!r}, f"grads{{accelerator.process_index}}.pt"))
"""


@pytest.mark.slow
def test_two_processes_step_as_one_process_with_the_same_batch(tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT.format(tests=HERE, root=ROOT, examples=os.path.join(ROOT, "examples"),
                                        out=str(tmp_path)))
    r = run_script(str(script), launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", "2"], env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    ddp = [torch.load(tmp_path / f"grads{k}.pt") for k in (0, 1)]
    one = lora_gradients()
    assert one and set(ddp[0]) == set(one)
    assert any(g.abs().max() > 0 for g in one.values())
    for name, g in one.items():
        torch.testing.assert_close(ddp[0][name], ddp[1][name], rtol=0, atol=0)  # all-reduced: the same on both
        torch.testing.assert_close(ddp[0][name], g, rtol=1e-4, atol=1e-6)
