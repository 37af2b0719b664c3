"""What diffusers, ComfyUI, AUTOMATIC1111 and the Hub load and show of our LoRA files: every targeted module
loads (both layouts, any --lora_target_modules), the kohya header says what the run was, DoRA survives the kohya
layout, checkpoints hold both files, the model card's YAML parses, infer.py names the trigger words; the kohya key names
follow the ecosystem's (lora_unet_/lora_te_, alpha per module)."""
import hashlib
import json
import os
import struct

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run_main, train_args

WIDE = ("to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut,time_emb_proj,proj_in,proj_out,ff.net.0.proj,ff.net.2,"
        "linear_1,linear_2,conv")


def tiny(kind):
    from make_tiny_model import build_tiny_pipeline, build_tiny_sdxl_pipeline
    from dreambooth.families import StableDiffusion, StableDiffusionXL
    pipe = build_tiny_sdxl_pipeline() if kind == "xl" else build_tiny_pipeline()
    return pipe, (StableDiffusionXL if kind == "xl" else StableDiffusion).from_pipeline(pipe)


def text_encoders(pipe):
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])


def trained_lora(kind, targets, text_encoder, dora=False):
    """A tiny pipeline with LoRA attached as the trainer attaches it, with random (non-zero) up weights and
    magnitudes, so every module's update is visible."""
    from dreambooth.models import LoraSettings, add_lora
    pipe, family = tiny(kind)
    add_lora(pipe.unet, text_encoders(pipe), LoraSettings(rank=2, lora_alpha=4, lora_target_modules=targets,
                                                          train_text_encoder=text_encoder, use_dora=dora))
    torch.manual_seed(1)
    for model in [pipe.unet] + text_encoders(pipe):
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.data.normal_(0, 0.5)
    return pipe, family


def effective_weights(pipe):
    """{part/module: the weight peft computes for it (base + scaled update, or DoRA's)} for every LoRA module."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    out = {}
    for part, model in [("unet", pipe.unet)] + [(f"te{i}", e) for i, e in enumerate(text_encoders(pipe))]:
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and module.lora_A:
                module.merge()
                out[f"{part}/{name}"] = module.get_base_layer().weight.detach().clone()
                module.unmerge()
    return out


def loaded_weights(kind, folder, weight_name, names):
    """The same modules' weights after diffusers' load_lora_weights + fuse_lora on a fresh base."""
    pipe, _ = tiny(kind)
    pipe.load_lora_weights(folder, weight_name=weight_name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    parts = {"unet": pipe.unet, **{f"te{i}": e for i, e in enumerate(text_encoders(pipe))}}
    return {n: parts[n.split("/")[0]].get_submodule(n.split("/", 1)[1]).weight.detach() for n in names}


@pytest.mark.parametrize("kind,targets,text_encoder", [("sd", "to_q,to_k,to_v,to_out.0", False), ("sd", WIDE, True),
                                                       ("xl", "to_q,to_k,to_v,to_out.0", True), ("xl", WIDE, False)])
def test_both_files_load_every_targeted_module_in_diffusers(kind, targets, text_encoder, tmp_path):
    from dreambooth import lora_io
    pipe, family = trained_lora(kind, targets, text_encoder)
    encoders = text_encoders(pipe) if text_encoder else []
    lora_io.save_diffusers_lora(str(tmp_path), family, pipe.unet, encoders)
    save_file(lora_io.kohya_state_dict(family, pipe.unet, encoders), str(tmp_path / "k.safetensors"))
    with safe_open(str(tmp_path / lora_io.LORA_WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
    # one key style: peft's, for attention and convolutions alike (a mix makes diffusers skip the attention)
    assert all(".lora_A." in k or ".lora_B." in k for k in keys), [k for k in keys if "lora_A" not in k][:3]
    expected = effective_weights(pipe)
    assert any(n.startswith("te") for n in expected) == text_encoder
    if targets == WIDE:  # the classes of layer the wide targets reach are all there
        for layer in ("conv1", "proj_in", "ff.net.2", "time_embedding.linear_1", "conv_shortcut", "attn1.to_q",
                      "upsamplers.0.conv", "downsamplers.0.conv") + (("add_embedding.linear_1",) if kind == "xl" else ()):
            assert any(n.endswith(layer) for n in expected), layer
    for weight_name in (lora_io.LORA_WEIGHT_NAME, "k.safetensors"):
        got = loaded_weights(kind, str(tmp_path), weight_name, expected)
        worst = max((got[n] - w).abs().max().item() for n, w in expected.items())
        assert worst < 1e-5, f"{weight_name}: {worst}"


def test_kohya_keys_name_modules_of_the_model():
    """An independent reading of the kohya names, as the UIs do it: each lora_unet_/lora_te_ name is a module of the
    model with '.' written '_' (SD: diffusers' UNet paths; SDXL: the original LDM paths, checked in test_sdxl), and
    the down/up shapes fit that module's weight."""
    from dreambooth import lora_io
    pipe, family = trained_lora("sd", WIDE, True)
    state = lora_io.kohya_state_dict(family, pipe.unet, [pipe.text_encoder])
    te = pipe.text_encoder
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules()
               if hasattr(m, "weight") and not n.endswith(("base_layer", "lora_A.default", "lora_B.default"))}
    modules.update({"lora_te_" + ("" if n.startswith("text_model.") else "text_model_") + n.replace(".", "_"): m
                    for n, m in te.named_modules() if hasattr(m, "weight")})
    names = {k.split(".")[0] for k in state}
    assert len(names) == len(effective_weights(pipe))
    for name in names:
        module = modules[name]
        weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        assert up.shape[0] == weight.shape[0] and down.shape[1] == weight.shape[1], name
        assert state[f"{name}.alpha"].item() == 4.0


def test_dora_kohya_file_gives_the_diffusers_weights(tmp_path):
    """diffusers' kohya loader drops dora_scale (it warns so), so the kohya DoRA file is read here as LyCORIS and
    ComfyUI read an output-axis dora_scale: W' = dora_scale * (W + up@down * alpha/rank) / ||row of it||."""
    from dreambooth import lora_io
    pipe, family = trained_lora("sd", "to_q,to_out.0,conv1,proj_in,ff.net.2,linear_1", True, dora=True)
    lora_io.save_diffusers_lora(str(tmp_path), family, pipe.unet, [pipe.text_encoder])
    state = lora_io.kohya_state_dict(family, pipe.unet, [pipe.text_encoder])
    expected = effective_weights(pipe)
    from_diffusers = loaded_weights("sd", str(tmp_path), lora_io.LORA_WEIGHT_NAME, expected)
    base, _ = tiny("sd")
    parts = {"lora_unet_": ("unet", base.unet), "lora_te_": ("te0", base.text_encoder)}
    checked = 0
    for name in {k.split(".")[0] for k in state}:
        prefix = "lora_unet_" if name.startswith("lora_unet_") else "lora_te_"
        part, model = parts[prefix]
        module = next(n for n in expected if n.startswith(part + "/") and
                      prefix + (n.split("/", 1)[1] if part == "unet" else "text_model." + n.split("/", 1)[1])
                      .replace(".", "_") == name)
        w = model.get_submodule(module.split("/", 1)[1]).weight.detach()
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        scale = state[f"{name}.dora_scale"]
        assert scale.shape == (w.shape[0],) + (1,) * (w.dim() - 1)  # output axis, as LyCORIS writes it
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * state[f"{name}.alpha"].item() / down.shape[0]
        merged = w + delta
        rebuilt = merged * scale / merged.reshape(w.shape[0], -1).norm(dim=1).reshape(scale.shape)
        torch.testing.assert_close(rebuilt, expected[module], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(from_diffusers[module], expected[module], atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked == len(expected) and any("conv1" in n for n in expected)


@pytest.mark.parametrize("text_width,cross,prediction,version,v2,arch", [
    (768, 768, "epsilon", "sd_v1", False, "stable-diffusion-v1"),
    (1024, 1024, "epsilon", "sd_v2", True, "stable-diffusion-v2-512"),
    (1024, 1024, "v_prediction", "sd_v2_v", True, "stable-diffusion-v2-768-v"),
])
def test_base_model_version_is_read_from_the_model(text_width, cross, prediction, version, v2, arch):
    """SD 1 vs SD 2 vs v-prediction from the sizes the real models have (CLIP ViT-L 768 / OpenCLIP ViT-H 1024), on
    one-layer text encoders of that width."""
    from make_tiny_model import build_tiny_pipeline
    from dreambooth.families import StableDiffusion
    pipe = build_tiny_pipeline(prediction, cross_attention_dim=cross, text_layers=1)
    assert pipe.text_encoder.config.hidden_size == text_width
    facts = StableDiffusion.from_pipeline(pipe).header_facts()
    assert (facts["ss_base_model_version"], facts["ss_v2"], facts["modelspec.architecture"]) == (version, str(v2), arch)
    assert facts["ss_v_parameterization"] == str(prediction == "v_prediction")
    assert facts["modelspec.implementation"] == "diffusers" and facts["ss_clip_skip"] == "1"
    assert StableDiffusion.from_pipeline(pipe).license() == ("openrail++" if v2 else "creativeml-openrail-m")


def test_sdxl_facts():
    pipe, family = tiny("xl")
    assert family.header_facts() == {
        "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_v_parameterization": "False",
        "ss_clip_skip": "None", "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.prediction_type": "epsilon"}


def test_base_hub_id_and_license_from_the_model_files(tmp_path):
    from dreambooth.report import base_hub_id, base_license
    snapshot = tmp_path / "hub" / "models--stabilityai--stable-diffusion-2-1" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert base_hub_id(str(snapshot)) == "stabilityai/stable-diffusion-2-1"
    assert base_hub_id("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    local = tmp_path / "mine"
    (local / "unet").mkdir(parents=True)
    (local / "unet" / "config.json").write_text(json.dumps({"_name_or_path": "someone/their-model"}))
    assert base_hub_id(str(local)) == "someone/their-model"
    (local / "unet" / "config.json").write_text(json.dumps({"_name_or_path": str(local)}))
    assert base_hub_id(str(local)) is None
    (local / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# card\n")
    assert base_license(str(local)) == ("apache-2.0", "the base model's card")


def sd_scripts_hashes(path):
    """sshs_model_hash / sshs_legacy_hash recomputed from the file on disk: rewrite it with only its ss_* header
    keys, then SHA-256 of the bytes after the header, and of the 64 KiB at 1 MiB (first 8 hex digits)."""
    from safetensors.torch import save
    with safe_open(path, "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k.startswith("ss_")}
    data = save(load_file(path), metadata=meta)
    n = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """One short run with captions, prior preservation, text-encoder LoRA, DoRA, wide targets and a checkpoint."""
    from conftest import draw_subject
    root = tmp_path_factory.mktemp("export")
    photos = root / "dog"
    photos.mkdir()
    for i in range(3):
        draw_subject(photos / f"dog{i}.png", shift=i * 3)
    (photos / "dog1.txt").write_text("a photo of sks dog, on grass")
    out = root / "sks-dog"
    r = run_main(*train_args(
        tiny_model["eps"], str(photos), str(out), "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--train_text_encoder", "--use_dora", "--lora_dropout", "0.1", "--rank", "2", "--lora_alpha", "4",
        "--lora_target_modules", "to_q,to_v,conv1,proj_in", "--with_prior_preservation", "--class_prompt",
        "a photo of dog", "--num_class_images", "2", "--class_generation_steps", "1", "--repeats", "2",
        "--validation_prompt", "a photo of sks dog", "--num_validation_images", "1", "--validation_steps", "2",
        "--report_to", "none"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_kohya_header_says_what_the_run_was(run):
    path = str(run / "sks-dog.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sd_scripts_hashes(path)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "sks-dog" and meta["modelspec.title"] == "sks-dog"
    assert json.loads(meta["ss_tag_frequency"]) == {"2_dog": {"a photo of sks dog": 3, "on grass": 1}}  # one caption repeats it
    assert meta["ss_num_train_images"] == "6" and meta["ss_num_reg_images"] == "2"  # 3 photos x 2 repeats
    assert meta["ss_learning_rate"] == "0.001" and meta["ss_seed"] == "0" and meta["ss_steps"] == "2"
    assert meta["ss_optimizer"].startswith("torch.optim.adamw.AdamW(")
    assert meta["ss_mixed_precision"] == "no" and meta["ss_clip_skip"] == "1"
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["ss_network_args"]) == {"dora_wd": "True", "dropout": "0.1"}
    started, finished = float(meta["ss_training_started_at"]), float(meta["ss_training_finished_at"])
    assert 1.6e9 < started <= finished < started + 600  # unix times, as A1111 parses them
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.trigger_phrase"] == "a photo of sks dog"
    assert meta["modelspec.license"] == "creativeml-openrail-m" and meta["modelspec.date"].startswith("20")
    keys = load_file(path)
    assert any(k.endswith(".dora_scale") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    # the diffusers file keeps the adapter metadata diffusers reads back (rank, alpha, DoRA)
    with safe_open(str(run / "pytorch_lora_weights.safetensors"), "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["unet.r"] == 2 and adapter["unet.lora_alpha"] == 4 and adapter["unet.use_dora"] is True


@pytest.mark.slow
def test_checkpoints_hold_both_files_and_the_card_parses(run):
    for step in (1, 2):
        files = set(os.listdir(run / f"checkpoint-{step}"))
        assert {"pytorch_lora_weights.safetensors", f"sks-dog-step{step:08d}.safetensors"} <= files
        with safe_open(str(run / f"checkpoint-{step}" / f"sks-dog-step{step:08d}.safetensors"), "pt") as f:
            assert f.metadata()["ss_steps"] == str(step)
    card = open(run / "README.md").read()
    head = yaml.safe_load(card.split("---")[1])
    assert head["license"] == "creativeml-openrail-m" and "base_model" not in head  # a local model: text only
    assert head["instance_prompt"] == "a photo of sks dog"
    assert {"text-to-image", "diffusers", "lora", "dreambooth", "diffusers-training", "template:sd-lora",
            "stable-diffusion"} <= set(head["tags"])
    assert head["widget"] == [{"text": "a photo of sks dog", "output": {"url": "validation/step-000002.png"}}]
    assert "Attachment A" in card and "sks-dog.safetensors" in card and "<lora:sks-dog:1>" in card
    assert "## Reproduce" in card and "| rank / alpha | 2 / 4.0 (DoRA) |" in card


@pytest.mark.slow
def test_infer_takes_a_kohya_only_folder_and_names_the_trigger_words(run, tiny_model, tmp_path, capsys):
    import shutil
    import infer
    folder = tmp_path / "ui"
    folder.mkdir()
    shutil.copy(run / "sks-dog.safetensors", folder / "sks-dog.safetensors")
    code = infer.main(["--base", tiny_model["eps"], "--lora", str(folder), "--prompt", "a dog on the beach",
                       "--prompt", "a photo of sks dog", "--num_images", "1", "--steps", "1", "--height", "64",
                       "--width", "64", "--output", str(tmp_path / "img")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f'--lora {folder} was trained with the trigger words "a photo of sks dog", which --prompt ' \
           '"a dog on the beach" does not contain' in err
    assert "is a DoRA LoRA in the kohya layout, whose magnitudes diffusers ignores" in err  # said, not silent
    assert os.path.isfile(tmp_path / "img" / "grid.png")


def test_kohya_keys_follow_the_ecosystem_names():
    from peft import LoraConfig
    from dreambooth.families import StableDiffusion
    from dreambooth.lora_io import kohya_state_dict
    from make_tiny_model import build_tiny_pipeline
    pipe = build_tiny_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_out.0"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    sd = kohya_state_dict(StableDiffusion.from_pipeline(pipe), pipe.unet, [pipe.text_encoder])
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in sd
    assert sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == 4.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    assert sd["lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight"].shape == (2, 32)

