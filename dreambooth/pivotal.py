"""Pivotal tuning (--train_text_encoder_ti), with the meaning of diffusers' advanced DreamBooth scripts: the
word --token_abstraction (TOK) in prompts and captions stands for --num_new_tokens_per_abstraction new tokens
(<s0><s1>), added to every tokenizer of the model family; only the new tokens' embedding rows train, for the
first --train_text_encoder_ti_frac of the run, alongside the LoRA.

The rows live in their own small fp32 parameter spliced into the text encoder's token embedding
(`NewTokenEmbedding`), not in a trainable copy of the whole table as in diffusers' script: the original rows
are then never written, so they stay bit-identical by construction (no restore after each step), the optimizer
keeps state for a few rows instead of 49 408, and a checkpoint holds only those rows.

The output `<name>_emb.safetensors` holds one tensor [tokens, width] per text encoder under the key the
ecosystem reads: `emb_params` for SD 1.x/2.x, `clip_l`/`clip_g` for SDXL (the family says which); its metadata
maps each abstraction word to its tokens, which infer.py reads to load them and rewrite prompts.

Stdlib at import: the flag checks use it before torch loads.
"""
import itertools
import json
import os
import re

from .errors import UsageError

EMB_SUFFIX = "_emb.safetensors"
TOKENS_METADATA = "dreambooth_token_map"  # in the embeddings file, and in the run's diffusers LoRA file
# the embeddings file a pivotal run's LoRA file needs, named in its header: the diffusers file's (ours) and the
# kohya file's (report.training_metadata writes ss_embeddings and ss_token_map), so a LoRA file found without its
# companion says what is missing instead of loading without the tokens and sending the word literally
EMBEDDINGS_METADATA = "dreambooth_embeddings"
UI_EMBEDDINGS_METADATA, UI_TOKENS_METADATA = "ss_embeddings", "ss_token_map"


# ---- words, tokens, prompts ----------------------------------------------------------------------------------
def abstractions(text):
    """--token_abstraction's comma-separated words ('TOK' or 'TOK,OBJ'), in order."""
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def token_map(words, per_word):
    """{word: [<s0>, <s1>, ...]}: new token names numbered across all words, as diffusers' script names them."""
    out, i = {}, 0
    for word in words:
        out[word] = [f"<s{j}>" for j in range(i, i + per_word)]
        i += per_word
    return out


def _word(word):
    return re.compile(r"(?<![\w<>])" + re.escape(word) + r"(?![\w<>])")


def rewrite(prompt, mapping, replacement=None):
    """Each abstraction word (a whole word: TOK, not TOKYO) replaced by its tokens written together, or by
    `replacement` (the UIs' prompt: the embedding file's name)."""
    for word, tokens in (mapping or {}).items():
        prompt = _word(word).sub("".join(tokens) if replacement is None else replacement, prompt)
    return prompt


def token_list(mapping):
    """Every new token of a word -> tokens map, in order (what load_textual_inversion and its unloading take)."""
    return [t for tokens in mapping.values() for t in tokens]


def embedding_file_name(output_dir):
    """<output_dir name>_emb.safetensors, beside the kohya file <output_dir name>.safetensors."""
    from .outputs import run_name  # outputs imports this module: asked at call time
    return run_name(output_dir) + EMB_SUFFIX


# CLIP's 77 positions less the start and end tokens: every family's pivotal encoders are CLIP ones
MAX_NEW_TOKENS = 75


# ---- flag checks (no model) ---------------------------------------------------------------------------------
def check_flags(args, notes):
    """The pivotal-tuning flags on their own and with the others; one line naming the flag and the fix."""
    if not 0 < args.train_transformer_frac <= 1:
        raise UsageError(f"--train_transformer_frac must be in (0, 1] (got {args.train_transformer_frac}): the share of "
                         "the steps the denoiser's LoRA trains (0, pure textual inversion, is not offered: the LoRA "
                         "file would be empty)")
    if args.train_transformer_frac < 1 and not (args.train_text_encoder_ti or args.train_text_encoder):
        raise UsageError(f"--train_transformer_frac {args.train_transformer_frac}: after that share of the steps "
                         "nothing would train; it is for runs that also train text encoders or new tokens "
                         "(--train_text_encoder_ti, --train_text_encoder)")
    if not 0 < args.train_text_encoder_frac <= 1:
        raise UsageError(f"--train_text_encoder_frac must be in (0, 1] (got {args.train_text_encoder_frac}): the "
                         "share of the steps the text encoder's LoRA trains")
    if not args.train_text_encoder_ti:
        given = [f"--{flag}" for flag, default in (("initializer_concept", None), ("token_abstraction", "TOK"),
                                                   ("num_new_tokens_per_abstraction", 2),
                                                   ("train_text_encoder_ti_frac", 0.5))
                 if getattr(args, flag) != default]
        if given:
            notes.append(f"warning: {' and '.join(given)} {'is' if len(given) == 1 else 'are'} ignored without "
                         "--train_text_encoder_ti (pivotal tuning); add it, or drop them")
        return
    if not 0 < args.train_text_encoder_ti_frac <= 1:
        raise UsageError(f"--train_text_encoder_ti_frac must be in (0, 1] (got {args.train_text_encoder_ti_frac}): "
                         "the share of the steps the new token embeddings train (0.5 is diffusers' default)")
    if args.num_new_tokens_per_abstraction < 1:
        raise UsageError(f"--num_new_tokens_per_abstraction must be >= 1 (got {args.num_new_tokens_per_abstraction})")
    if args.num_new_tokens_per_abstraction > MAX_NEW_TOKENS:  # before the tokenizer is asked to add them all
        raise UsageError(f"--num_new_tokens_per_abstraction {args.num_new_tokens_per_abstraction} cannot fit in a "
                         f"prompt: CLIP reads {MAX_NEW_TOKENS} tokens besides its start and end; use 1-4 (diffusers' "
                         "default is 2)")
    words = abstractions(args.token_abstraction)
    if not words:
        raise UsageError("--token_abstraction is empty; give the word that stands for the subject in prompts, e.g. TOK")
    for word in words:
        if re.search(r"\s", word) or "<" in word or ">" in word:
            raise UsageError(f"--token_abstraction {word!r}: one word per abstraction, without spaces or <>; e.g. TOK")
    if args.pre_compute_text_embeddings:
        raise UsageError("--pre_compute_text_embeddings cannot be used with --train_text_encoder_ti (the new tokens' "
                         "embeddings train, so the prompts' text embeddings change every step); drop one of them")
    if args.initializer_concept is not None and not args.initializer_concept.strip():
        raise UsageError("--initializer_concept is empty; give words whose embeddings start the new tokens (e.g. "
                         "'dog'), or leave it out for a random start")


def check_words_used(args, images, notes):
    """Every abstraction word should appear in --instance_prompt or a caption: a word in no prompt leaves its
    tokens untrained. diffusers' advanced scripts go on with a warning (their tests train with --instance_prompt
    photo), and so do we, loudly: the LoRA still trains. Runs once the captions are known."""
    if not args.train_text_encoder_ti:
        return
    from .prompt_lengths import training_prompts
    # what trains: each photo's caption where it has one (--instance_prompt only for the photos without)
    used = [(where, text) for where, text in training_prompts(args, images)
            if where.startswith(("caption", "--instance"))]
    for word in abstractions(args.token_abstraction):
        if any(_word(word).search(t) for _, t in used):
            lacking = [where.removeprefix("caption file ") for where, t in used if not _word(word).search(t)]
            if lacking:  # those photos train the LoRA without the new tokens: a subject split in two
                notes.append(f"warning: --token_abstraction {word}: {len(lacking)} prompt(s) that train lack the "
                             f"word ({', '.join(os.path.basename(w) if os.sep in w else w for w in lacking[:3])}"
                             f"{', …' if len(lacking) > 3 else ''}), so those photos train without its new tokens; "
                             f"name the subject with {word} in each")
            continue
        if _word(word).search(args.instance_prompt or ""):  # there, but every photo has a caption that replaces it
            notes.append(f"warning: --token_abstraction {word}: every photo has a caption file and none has the "
                         f"word (--instance_prompt, which has it, is used only for photos without one), so its new "
                         f"tokens will not train (the LoRA still does); put {word} in the captions")
        else:
            notes.append(f"warning: --token_abstraction {word}: the word is in neither --instance_prompt nor any "
                         f"caption, so its new tokens will not train (the LoRA still does); name the subject with it, "
                         f"e.g. --instance_prompt 'a photo of {word} dog'")


# ---- the trainable rows -------------------------------------------------------------------------------------
def _module():
    import torch

    class NewTokenEmbedding(torch.nn.Module):
        """A token embedding whose new tokens' rows come from `new` (trainable, fp32) and every other row from the
        original, frozen table, untouched. Ids the tokenizer gave the new tokens may lie inside the table (a
        tokenizer smaller than its embedding) or past it: `slot` maps each id to its new row, or -1."""

        def __init__(self, base, ids, rows):
            super().__init__()
            self.base = base
            self.new = torch.nn.Parameter(rows.detach().to(base.weight.device, torch.float32).clone())
            slot = torch.full((max(base.num_embeddings, max(ids) + 1),), -1, dtype=torch.long)
            slot[torch.tensor(ids)] = torch.arange(len(ids))
            self.register_buffer("slot", slot.to(base.weight.device), persistent=False)
            self.ids = list(ids)

        @property
        def weight(self):
            """The whole table as it now reads (for code that looks at .weight, e.g. the embedding width)."""
            table = self.base.weight.detach()
            if self.slot.numel() > table.shape[0]:
                table = torch.cat([table, table.new_zeros(self.slot.numel() - table.shape[0], table.shape[1])])
            table = table.clone()
            table[torch.tensor(self.ids, device=table.device)] = self.new.detach().to(table.dtype)
            return table

        @property
        def embedding_dim(self):
            return self.base.embedding_dim

        @property
        def num_embeddings(self):
            return self.slot.numel()

        def forward(self, input_ids):
            slot = self.slot[input_ids]
            old = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
            new = self.new[slot.clamp(min=0)].to(old.dtype)
            return torch.where((slot >= 0).unsqueeze(-1), new, old)

    return NewTokenEmbedding


class PivotalTokens:
    """The run's new tokens across the family's tokenizers and text encoders: added, initialised, trained rows
    read and written."""

    def __init__(self, family, mapping):
        self.family, self.mapping = family, mapping
        self.tokens = token_list(mapping)
        self.modules = []
        self.indices = family.pivotal_text_encoders(family.options)  # which encoders get rows (SD 3: the CLIPs)
        self.keys = [family.embedding_file_keys[i] for i in self.indices]

    def install(self, initializer_concept=None, seed=0):
        """Adds the tokens to every tokenizer and splices their rows into every text encoder. Rows start from
        the embeddings of --initializer_concept's tokens (cycled), or random at the table's own scale (diffusers'
        script does the same), from a generator of their own so the run's other random numbers do not move."""
        import torch
        NewTokenEmbedding = _module()
        generator = torch.Generator().manual_seed(seed or 0)
        added = set()  # a family may share one tokenizer between its encoders
        for tokenizer, encoder in ((self.family.tokenizers[i], self.family.text_encoders[i]) for i in self.indices):
            if id(tokenizer) not in added:
                if any(t in tokenizer.get_vocab() for t in self.tokens):
                    raise UsageError(f"--train_text_encoder_ti: the tokenizer already has a token named "
                                     f"{self.tokens[0]}; this base was trained with pivotal tuning already")
                tokenizer.add_tokens(self.tokens)
                added.add(id(tokenizer))
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            base = encoder.get_input_embeddings()
            table = base.weight.detach().float().cpu()
            if initializer_concept:
                source = tokenizer.encode(initializer_concept, add_special_tokens=False)
                if not source:
                    raise UsageError(f"--initializer_concept {initializer_concept!r}: the tokenizer makes no tokens of "
                                     "it; give a word, e.g. 'dog'")
                rows = torch.stack([table[source[i % len(source)]] for i in range(len(ids))])
            else:
                rows = torch.randn(len(ids), table.shape[1], generator=generator) * table.std()
            module = NewTokenEmbedding(base, ids, rows)
            encoder.set_input_embeddings(module)
            self.modules.append(module)
        return self

    def parameters(self):
        return [m.new for m in self.modules]

    def encoders(self):
        """The text encoders whose new rows train (their output changes as the run trains)."""
        return [self.family.text_encoders[i] for i in self.indices]

    def state_dict(self):
        """{file key: rows [tokens, width] fp32 on the CPU} per text encoder, in the family's key names."""
        return {key: m.new.detach().to("cpu").float().contiguous()
                for key, m in zip(self.keys, self.modules)}

    def save(self, path):
        """The embeddings file, written atomically, with the word -> tokens map in its metadata."""
        from safetensors.torch import save_file
        from .files import atomic_write
        state = self.state_dict()
        from .redaction import scrub_values
        metadata = scrub_values({TOKENS_METADATA: json.dumps(self.mapping)})
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
        return path

    def load(self, path):
        """Rows back from a checkpoint's embeddings file (resume); every encoder's rows must be there, same shape."""
        from safetensors.torch import load_file
        state = load_file(path)
        for key, module in zip(self.keys, self.modules):
            if key not in state or state[key].shape != module.new.shape:
                found = tuple(state[key].shape) if key in state else "missing"
                raise ValueError(f"{os.path.basename(path)}: {key} is {found}, expected {tuple(module.new.shape)}")
            with __import__("torch").no_grad():
                module.new.copy_(state[key])

    def lora_metadata(self, embedding_name):
        """The header entries of the run's diffusers LoRA file that name its embeddings file and its words."""
        return {EMBEDDINGS_METADATA: embedding_name, TOKENS_METADATA: json.dumps(self.mapping)}

    def prompt_example(self, instance_prompt):
        return rewrite(instance_prompt, self.mapping)

    def ui_prompt(self, instance_prompt, embedding_name):
        """The prompt for A1111/ComfyUI, where an embedding file's name is its word: "a photo of <name>_emb dog"."""
        return rewrite(instance_prompt, self.mapping, embedding_name.removesuffix(".safetensors"))


def find_embedding_file(folder):
    """The *_emb.safetensors in a training output or checkpoint folder, or None."""
    if not os.path.isdir(folder):
        return None
    found = sorted(n for n in os.listdir(folder) if n.endswith(EMB_SUFFIX))
    return os.path.join(folder, found[0]) if found else None


def _json_map(text):
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def read_token_map(path):
    """The word -> tokens map in an embeddings file's header (stdlib: flag checks read it before torch loads)."""
    from .files import safetensors_metadata
    return _json_map(safetensors_metadata(path).get(TOKENS_METADATA))


def is_embeddings_file(path):
    """True for a pivotal run's embeddings file (a token map, no LoRA weights): given where a LoRA is wanted."""
    from .files import safetensors_header
    header = safetensors_header(path) or {}
    return TOKENS_METADATA in (header.get("__metadata__") or {}) and not any(".lora" in k for k in header)


def needed_embeddings(lora_file):
    """(embeddings file name, word -> tokens map) that a LoRA file's header says it needs; (None, {}) for a LoRA
    trained without pivotal tuning, or written before our diffusers files named their companion."""
    from .files import safetensors_metadata
    meta = safetensors_metadata(lora_file)
    name = meta.get(EMBEDDINGS_METADATA) or meta.get(UI_EMBEDDINGS_METADATA)
    mapping = _json_map(meta.get(TOKENS_METADATA) or meta.get(UI_TOKENS_METADATA))
    return (os.path.basename(name), mapping) if isinstance(name, str) and name else (None, {})


def lora_embeddings(lora, flag="--lora"):
    """The embeddings file that comes with a LoRA (a training output or checkpoint-N folder, or a LoRA file of one):
    its path, or None for a LoRA trained without pivotal tuning. The file the LoRA's header names, beside it; for
    LoRA files that name none, <name>_emb beside <name>, or the run folder's own beside pytorch_lora_weights. A
    LoRA that names a file that is not there is refused in one line: loaded alone it would draw nothing of the
    subject, its word sent to the text encoder as plain text."""
    folder = lora if os.path.isdir(lora) else os.path.dirname(os.path.abspath(lora))
    files = ([os.path.join(lora, n) for n in sorted(os.listdir(lora))
              if n.endswith(".safetensors") and not n.endswith(EMB_SUFFIX)] if os.path.isdir(lora) else [lora])
    for path in files:
        name, mapping = needed_embeddings(path)
        if name is None:
            continue
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
        words = ", ".join(f"{w} -> {''.join(t)}" for w, t in mapping.items()) or "its trigger word"
        raise UsageError(f"{flag} {lora}: its new tokens ({words}, from pivotal tuning) are in {name}, which is not "
                         f"in {folder}; copy that file there from the same training output or checkpoint-N folder, "
                         f"or give {flag} that folder")
    if os.path.isdir(lora):
        return find_embedding_file(lora)
    beside = os.path.splitext(lora)[0] + EMB_SUFFIX
    if os.path.isfile(beside):
        return beside
    if os.path.basename(lora) == "pytorch_lora_weights.safetensors":  # a run's own folder, from before the file
        return find_embedding_file(folder)                             # named its companion
    return None


def word_clash(loras, flag="--lora"):
    """Several pivotal LoRAs stacked: each one's tokens load under names of their own (load_into_pipeline), but one
    word (TOK) trained by two cannot say which subject a prompt means; the one line for that, or None."""
    owners = {}
    for lora in loras:
        path = lora_embeddings(lora, flag)
        for word in read_token_map(path) if path else {}:
            if word in owners:
                other = owners[word]
                if os.path.realpath(other) == os.path.realpath(lora):
                    return f"{flag} {lora} is given twice; give it once (--lora_scale sets its strength)"
                return (f"{flag} {lora} and {flag} {other} both trained new tokens for the word {word}, so a prompt "
                        f"cannot say which subject it means; stack LoRAs trained with different --token_abstraction "
                        f"words (retrain one, e.g. with --token_abstraction {word}2)")
            owners[word] = lora
    return None


def load_into_pipeline(pipe, path):
    """Loads an embeddings file into a diffusers pipeline with its own `load_textual_inversion`, once per text
    encoder (SDXL: clip_l into text_encoder/tokenizer, clip_g into text_encoder_2/tokenizer_2); returns the
    word -> tokens map to rewrite prompts with."""
    from safetensors.torch import load_file
    mapping = read_token_map(path)
    if not token_list(mapping):
        raise UsageError(f"{path}: no token map in its metadata; it was not written by this trainer")
    return load_state_into_pipeline(pipe, mapping, load_file(path))


def load_state_into_pipeline(pipe, mapping, state):
    """load_into_pipeline for rows already read: {family key (emb_params, clip_l...): rows [tokens, width]}."""
    from .families import family_of_pipeline
    tokens = token_list(mapping)
    family = family_of_pipeline(pipe)
    # Every run names its tokens <s0><s1>...: a second pivotal LoRA (or a base that has such tokens) gets the next
    # free names instead, so stacked runs keep their own rows; the map returned says which names prompts use.
    used = {t for name in family.tokenizer_names if getattr(pipe, name, None) is not None
            for t in getattr(pipe, name).get_vocab()}
    rename, free = {}, (f"<s{n}>" for n in itertools.count())
    for token in tokens:
        rename[token] = token if token not in used else next(t for t in free if t not in used and t not in tokens)
        used.add(rename[token])
    mapping = {word: [rename[t] for t in ts] for word, ts in mapping.items()}
    tokens = token_list(mapping)
    for key, encoder_name, tokenizer_name in zip(family.embedding_file_keys, family.text_encoder_names,
                                                 family.tokenizer_names):
        if key not in state:  # an encoder the run did not give new tokens (SD 3's T5)
            continue
        encoder, tokenizer = getattr(pipe, encoder_name), getattr(pipe, tokenizer_name)
        if hasattr(pipe, "load_textual_inversion"):
            pipe.load_textual_inversion(state[key], token=tokens, text_encoder=encoder, tokenizer=tokenizer)
        else:  # StableDiffusion3Pipeline has no textual-inversion loader: the same three steps by hand
            add_rows(tokenizer, encoder, tokens, state[key])
    return mapping


def add_rows(tokenizer, encoder, tokens, rows):
    """New tokens into a tokenizer and their embedding rows into its text encoder (what diffusers'
    load_textual_inversion does, for pipelines that lack it)."""
    import torch
    tokenizer.add_tokens(tokens)
    encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    table = encoder.get_input_embeddings().weight
    if rows.shape != (len(ids), table.shape[1]):
        raise ValueError(f"embeddings of shape {tuple(rows.shape)} for {len(ids)} tokens of width {table.shape[1]}")
    with torch.no_grad():
        table[torch.tensor(ids)] = rows.to(table.device, table.dtype)
