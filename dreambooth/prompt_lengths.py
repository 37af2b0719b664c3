"""Prompts against the text encoders' lengths, checked with the tokenizers alone, before any weights load.

A tokenizer cuts every prompt at its encoder's length (77 tokens for CLIP) without a word: the words past the cut
are never trained on, and a pivotal trigger past it leaves its new token rows untrained on that photo. What is
checked is what trains: each photo's caption where it has one, else --instance_prompt; the class prompt; the
validation prompt. Loading tokenizers costs a fraction of a second (a download of a few files for a hub id).
"""
import copy
import json
import os

from .errors import UsageError

# what a CLIP text encoder's position table allows; --tokenizer_max_length above it indexes past the table
POSITION_KEY = "max_position_embeddings"


def text_side(family_class, source, options):
    """A family object holding only the tokenizers of a model folder (no weights), configured with the family's
    flags; None for a single-file checkpoint (its tokenizers come with the load)."""
    from transformers import AutoTokenizer
    if os.path.isfile(source.path):
        return None
    absent = family_class._absent(source)
    names = [n for n in family_class.text_encoder_names if n not in absent]
    tokenizers = []
    for name in names:
        sub = family_class.tokenizer_names[family_class.text_encoder_names.index(name)]
        try:
            tokenizers.append(AutoTokenizer.from_pretrained(source.path, subfolder=sub, revision=source.revision,
                                                            cache_dir=source.cache_dir))
        except Exception:  # a problem the model load names in its own words, with the right flag
            return None
    if source.tokenizer_name:
        try:
            tokenizers[0] = AutoTokenizer.from_pretrained(source.tokenizer_name, revision=source.revision)
        except Exception:
            return None
    family = family_class(tokenizers, [None] * len(names), None, None, None, names)
    return family.configure(**options)


def position_limits(source, names):
    """Each named text encoder's position table size from its config.json (None where it has none: T5)."""
    limits = []
    for name in names:
        path = os.path.join(source.path, name, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                limits.append(json.load(f).get(POSITION_KEY))
        except (OSError, ValueError):
            limits.append(None)
    return limits


def check_max_length(max_length, names, limits):
    """--tokenizer_max_length longer than a text encoder's position table: refused (it would fail mid-run)."""
    for name, limit in zip(names, limits):
        if max_length and limit and max_length > limit:
            raise UsageError(f"--tokenizer_max_length {max_length} is more than the {limit} positions the model's "
                             f"{name} has; use {limit} or less (or leave it out: the tokenizer's own length)")


def check_prompt_lengths(family, max_length, prompts, mapping, pivotal_encoders, notes, training=True):
    """prompts: [(where it comes from, text)] as they train; mapping: pivotal tuning's {word: [new tokens]} or None;
    pivotal_encoders: the indices of the encoders that get new rows. A trigger word whose new tokens fall past the
    cut is an error (its rows would not train on that prompt; in infer.py, training=False: the trigger would be
    dropped); other cut prompts are a note."""
    lengths = family.max_lengths(max_length)
    if mapping:
        from .pivotal import rewrite, _word
        new_tokens = [t for tokens in mapping.values() for t in tokens]
        for index in pivotal_encoders:
            if index >= len(family.tokenizers):
                continue
            tokenizer, length = copy.deepcopy(family.tokenizers[index]), lengths[index]
            tokenizer.add_tokens(new_tokens)
            new_ids = set(tokenizer.convert_tokens_to_ids(new_tokens))
            for where, text in prompts:
                words = [w for w in mapping if _word(w).search(text)]
                if not words:
                    continue
                ids = _ids(tokenizer, rewrite(text, mapping))
                cut = [i for i in ids[length - 1:-1] if i in new_ids]  # the cut keeps length - 1 and the end token
                if cut:
                    raise UsageError(
                        f"{where}: the new tokens of {words[0]} fall past the {length} tokens "
                        f"{family.text_encoder_names[index]} reads ({len(ids)} with them), so "
                        + ("they would not train on it" if training else "the image would not get the subject")
                        + f"; shorten it or move {words[0]} nearer the start")
    # the encoder that reads the most decides what is lost (SD 3 / Flux: T5; CLIP's shorter cut is by design)
    longest = max(range(len(lengths)), key=lambda i: lengths[i])
    tokenizer, length = family.tokenizers[longest], lengths[longest]
    cut = [(where, ids) for where, text in prompts if len(ids := _ids(tokenizer, text)) > length]
    if cut:
        where, ids = cut[0]
        tail = tokenizer.decode(ids[length - 4:length - 1], skip_special_tokens=True).strip()
        notes.append(f"note: {len(cut)} prompt(s) are longer than the {length} tokens the text encoder reads; the "
                     f"words after '{tail}' are " + ("not trained on" if training else "ignored")
                     + f" (e.g. {where}); shorten them")


def check_all(family, args, images, limits, notes):
    """Both checks for a run: --tokenizer_max_length against the position tables, then every prompt that trains."""
    from . import pivotal
    check_max_length(args.tokenizer_max_length, family.text_encoder_names, limits)
    mapping = (pivotal.token_map(pivotal.abstractions(args.token_abstraction), args.num_new_tokens_per_abstraction)
               if args.train_text_encoder_ti else None)
    check_prompt_lengths(family, args.tokenizer_max_length, training_prompts(args, images), mapping,
                         family.pivotal_text_encoders(family.options), notes)


def _ids(tokenizer, text):
    """Every token id of a prompt, uncut (tokenizers warn about length: that is what we say here, once)."""
    return tokenizer(text, truncation=False, verbose=False).input_ids


def training_prompts(args, images):
    """[(where, text)]: each photo's caption where it has one, else --instance_prompt; the class and validation
    prompts. Caption files were read and checked already (images.check_captions)."""
    from .images import caption_path, read_caption
    out = []
    for path in images:
        caption = caption_path(path)
        if os.path.isfile(caption):
            out.append((f"caption file {caption}", read_caption(caption)))
        elif args.instance_prompt:
            out.append(("--instance_prompt", args.instance_prompt))
    if args.with_prior_preservation and args.class_prompt:
        out.append(("--class_prompt", args.class_prompt))
    if args.validation_prompt:
        out.append(("--validation_prompt", args.validation_prompt))
    unique, seen = [], set()
    for where, text in out:  # --instance_prompt once, however many photos use it
        if (where, text) not in seen:
            seen.add((where, text))
            unique.append((where, text))
    return unique


def check_inference_prompts(pipe, family_class, prompts, mapping, notes):
    """infer.py's prompts against the loaded pipeline's tokenizers, at the lengths the pipeline itself uses (its
    T5 default for SD 3 / Flux): a trigger whose new tokens would be cut is refused, a cut prompt noted. diffusers
    logs its own truncation warning, which our quiet logging hides."""
    import inspect
    family = family_class.from_pipeline(pipe)
    default = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    if default is not None and default.default is not inspect.Parameter.empty:
        family.configure(max_sequence_length=default.default)
    check_prompt_lengths(family, None, [(f"--prompt '{p}'", p) for p in prompts], mapping or None,
                         family.pivotal_text_encoders(family.options), notes, training=False)
