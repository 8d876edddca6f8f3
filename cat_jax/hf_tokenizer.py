"""A Hugging Face checkpoint's tokenizer, applied exactly as transformers' `tokenizer(text)` does,
through the `tokenizers` library alone (no transformers, no TensorFlow).

`HFTokenizerVocabulary(directory)` reads the tokenizer files a Hub checkpoint ships:
`tokenizer.json` (or, without one, a SentencePiece `tokenizer.model`, converted as transformers
converts it: `cat_jax.spm_convert`), `tokenizer_config.json`, `special_tokens_map.json` and
`generation_config.json`, and resolves them as `AutoTokenizer.from_pretrained` (v4.57) does
(`PreTrainedTokenizerFast.__init__`, `PreTrainedTokenizerBase._from_pretrained`, and the
`update_post_processor` of `LlamaTokenizerFast` / `GemmaTokenizerFast`):

* the class is tokenizer_config's `tokenizer_class` (its fast version); its defaults give the
  special tokens the files leave out;
* special tokens: tokenizer_config's values; special_tokens_map.json's override them only where
  tokenizer_config has no `added_tokens_decoder` (transformers' legacy path);
* tokens of `added_tokens_decoder` (and special tokens) missing from the tokenizer, or stored with
  other flags, are added to it;
* Llama and Gemma classes replace the stored post-processor by `[bos] $A [eos]` following
  `add_bos_token` / `add_eos_token` (defaults True / False); other classes (Llama 3's
  PreTrainedTokenizerFast, Qwen2) keep tokenizer.json's post-processor;
* a top-level pre-tokenizer's `add_prefix_space` follows tokenizer_config's (default False);
* truncation and padding stored in tokenizer.json are off (transformers turns them off per call);
* decoding skips special tokens, then applies `clean_up_tokenization_spaces`.

Ids: `encode_prompt(text)` is `tokenizer(text)["input_ids"]` (the prompt's special tokens, e.g.
BOS, included); `encode_continuation(text)` (= `encode`) is
`tokenizer(text, add_special_tokens=False)["input_ids"]`; and
`encode_prompt(t) == prompt_prefix_ids + encode(t) + prompt_suffix_ids` for every text, so a
pipeline that tokenized without special tokens (seqio) adds them afterwards. `eos_id` is the
tokenizer's eos token (what `add_eos` appends to a completion); `stop_ids` adds
generation_config.json's `eos_token_id`s (the ids a decoder stops at).

Padding: `pad_id` is 0, the project's batch padding, whatever the tokenizer says (many decoder
tokenizers have no pad token, and for Llama 3 or Qwen2 id 0 is the real token "!"). Batches carry
explicit loss weights and attention masks, so a padded 0 is never read as a token, and `decode`
stops at the first stop id, so padding after EOS is never decoded. Code must therefore never infer
padding from `id == 0` for these vocabularies. The tokenizer's own pad token is `tokenizer_pad_id`.

Identity (`tokenizer_sha256`): the SHA-256 of the normalised tokenizer (tokenizer.json parsed and
re-serialised with sorted keys, merges as pairs, truncation and padding left out; or the
SentencePiece model's SHA-256) together with the resolved settings above, so copies of the files,
or files that differ only in what does not change tokenization (a chat template,
`model_max_length`), compare equal. generation_config.json is not part of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cat_jax import spm_convert
from cat_jax.errors import ConfigError

PAD_ID = 0
TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
ADDED_TOKENS = "added_tokens.json"
# The files a checkpoint's tokenizer is read from (and that a MODEL_DIR stores), in this order.
FILES = (TOKENIZER_JSON, SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG)
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers' SPECIAL_TOKENS_ATTRIBUTES (then additional_special_tokens and extra_special_tokens).
SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
FLAGS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


@dataclasses.dataclass(frozen=True)
class TokenizerClass:
    """What a transformers fast tokenizer class adds to the files: special-token defaults, whether it
    templates BOS/EOS itself, and the SentencePiece conversion it uses without a tokenizer.json."""

    defaults: Mapping[str, Any]
    templates: bool = False
    spm_style: str | None = None


# transformers' classes of the supported decoder families (tokenization_llama_fast.py,
# tokenization_gemma_fast.py, tokenization_qwen2_fast.py, tokenization_utils_fast.py).
CLASSES = {
    "PreTrainedTokenizerFast": TokenizerClass({}),
    "LlamaTokenizerFast": TokenizerClass(
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "add_prefix_space": None,
        },
        templates=True,
        spm_style="llama",
    ),
    "GemmaTokenizerFast": TokenizerClass(
        {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "add_bos_token": True,
            "add_eos_token": False,
        },
        templates=True,
        spm_style="gemma",
    ),
    "Qwen2TokenizerFast": TokenizerClass(
        {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    ),
}


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); copy the checkpoint's file again.") from e


def _content(token: Any) -> str | None:
    """A special token's text: tokenizer_config holds a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before . ? ! , and English contractions."""
    for old, new in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(old, new)
    return text


def normalised_tokenizer_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """tokenizer.json without what transformers ignores (truncation, padding), merges as pairs."""
    data = {k: v for k, v in data.items() if k not in ("truncation", "padding")}
    model = data.get("model") or {}
    if isinstance(model.get("merges"), list):
        merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
        data["model"] = {**model, "merges": merges}
    return data


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class HFTokenizerVocabulary:
    """A Hub checkpoint's tokenizer with the interface of `cat_jax.vocabularies` (see the module doc).

    `directory` holds the checkpoint's tokenizer files; `files` names which of `FILES` are read
    (a MODEL_DIR names the ones it stored: each must exist); by default every one present.
    """

    def __init__(self, directory: str, files: Sequence[str] | None = None):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        names = FILES if files is None else tuple(files)
        unknown = sorted(set(names) - set(FILES))
        if unknown:
            raise ConfigError(f"Unknown tokenizer files {unknown} for {self.directory}; expected some of {FILES}.")
        self.files = {
            n: os.path.join(self.directory, n)
            for n in FILES
            if n in names and os.path.isfile(os.path.join(self.directory, n))
        }
        missing = [n for n in names if n not in self.files] if files is not None else []
        if missing:
            raise ConfigError(
                f"{self.directory} lacks the tokenizer files {missing} it should hold; copy them "
                "again from the checkpoint the directory was made from."
            )
        if TOKENIZER_CONFIG not in self.files:
            raise ConfigError(
                f"{self.directory} has no {TOKENIZER_CONFIG}; cat_jax reads a Hugging Face tokenizer from "
                f"the files the Hub ships with it ({TOKENIZER_CONFIG} and {TOKENIZER_JSON} or "
                f"{SENTENCEPIECE_MODEL}). Download them with the checkpoint."
            )
        config = _read_json(self.files[TOKENIZER_CONFIG])
        self._init_kwargs, self._class_name = self._resolve_config(config)
        self._tokenizer, source = self._backend()
        self._apply_added_tokens()
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._tokenizer.encode_special_tokens = bool(self._init_kwargs.get("split_special_tokens", False))
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self._size = max(vocab.values()) + 1
        self._ids = {key: self._token_id(self._init_kwargs.get(key)) for key in SPECIAL_KEYS}
        self._generation = _read_json(self.files[GENERATION_CONFIG]) if GENERATION_CONFIG in self.files else {}
        if self._templates:
            self._set_template()
        self.prompt_prefix_ids, self.prompt_suffix_ids = self._prompt_special_ids()
        self.tokenizer_sha256 = hashlib.sha256(_canonical({"tokenizer": source, "settings": self.settings})).hexdigest()

    # ---- reading the files as transformers does ----

    def _resolve_config(self, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
        name = config.get("tokenizer_class")
        fast = f"{name.removesuffix('Fast')}Fast" if name != "PreTrainedTokenizerFast" and name else name
        if fast not in CLASSES:
            raise ConfigError(
                f"{self.files[TOKENIZER_CONFIG]} names tokenizer_class {name!r}; cat_jax applies the "
                f"tokenizers of {sorted(CLASSES)} (Llama, Mistral, Qwen2/3, Gemma checkpoints)."
            )
        kwargs = {**CLASSES[fast].defaults, **config}
        if "added_tokens_decoder" not in config:
            if os.path.isfile(os.path.join(self.directory, ADDED_TOKENS)):
                raise ConfigError(
                    f"{self.directory} has {ADDED_TOKENS} and a {TOKENIZER_CONFIG} without "
                    "added_tokens_decoder (a tokenizer saved by transformers before v4.34); load and save "
                    "it again with a current transformers so that tokenizer_config.json lists its tokens."
                )
            if SPECIAL_TOKENS_MAP in self.files:
                kwargs.update(_read_json(self.files[SPECIAL_TOKENS_MAP]))
        return kwargs, fast

    @property
    def _templates(self) -> bool:
        return CLASSES[self._class_name].templates

    def _backend(self) -> tuple[Any, Any]:
        """(the `tokenizers.Tokenizer` of the files, the normalised source its identity hashes).

        transformers reads tokenizer.json, or converts tokenizer.model without one, or when a
        LlamaTokenizer's config sets add_prefix_space (LlamaTokenizerFast's `from_slow`)."""
        from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

        style = CLASSES[self._class_name].spm_style
        prefix_space = self._init_kwargs.get("add_prefix_space")
        from_slow = style == "llama" and prefix_space is not None
        if TOKENIZER_JSON in self.files and not from_slow:
            data = _read_json(self.files[TOKENIZER_JSON])
            self._set_prefix_space(data)
            return Tokenizer.from_str(json.dumps(data)), normalised_tokenizer_json(data)
        if style is None:
            raise ConfigError(
                f"{self.directory} has no {TOKENIZER_JSON}, the only file a {self._class_name} "
                f"is read from; copy the checkpoint's {TOKENIZER_JSON}."
            )
        if SENTENCEPIECE_MODEL not in self.files:
            why = (
                f"{self.files[TOKENIZER_CONFIG]} sets add_prefix_space, so transformers builds the "
                f"tokenizer from {SENTENCEPIECE_MODEL}, which it lacks"
                if from_slow
                else f"{self.directory} has no {TOKENIZER_JSON} and no {SENTENCEPIECE_MODEL}"
            )
            raise ConfigError(f"{why}; copy the checkpoint's tokenizer files.")
        with open(self.files[SENTENCEPIECE_MODEL], "rb") as f:
            model = f.read()
        legacy = self._init_kwargs.get("legacy")
        tokenizer = spm_convert.convert(
            model,
            style,
            legacy=True if legacy is None else bool(legacy),
            add_prefix_space=prefix_space is not False,  # the slow LlamaTokenizer's default: True
            specials=tuple(_content(self._init_kwargs.get(k)) for k in ("pad_token", "eos_token", "bos_token")),
        )
        return tokenizer, {"sentencepiece_sha256": hashlib.sha256(model).hexdigest()}

    def _set_prefix_space(self, data: dict[str, Any]) -> None:
        """A top-level pre-tokenizer's add_prefix_space follows tokenizer_config's (default False)."""
        wanted = self._init_kwargs.get("add_prefix_space", False)
        pre = data.get("pre_tokenizer")
        if isinstance(pre, dict) and "add_prefix_space" in pre and isinstance(wanted, bool):
            data["pre_tokenizer"] = {**pre, "add_prefix_space": wanted}

    def _special_tokens(self) -> list[Any]:
        """transformers' `all_special_tokens_extended`: the special-token attributes, then the
        additional and the model-specific (extra) special tokens, first occurrence of each text."""
        tokens = [self._init_kwargs.get(k) for k in SPECIAL_ATTRIBUTES]
        tokens += list(self._init_kwargs.get("additional_special_tokens") or [])
        tokens += list((self._init_kwargs.get("extra_special_tokens") or {}).values())
        unique: dict[str, Any] = {}
        for token in tokens:
            if _content(token) is not None:
                unique.setdefault(_content(token), token)
        return list(unique.values())

    def _apply_added_tokens(self) -> None:
        """Add `added_tokens_decoder` entries the tokenizer lacks (or holds with other flags) and
        special tokens it does not know (PreTrainedTokenizerFast.__init__)."""
        from tokenizers import AddedToken  # pylint: disable=import-outside-toplevel

        def flags(token: Any) -> tuple:
            return tuple(getattr(token, f) for f in FLAGS)

        held = {flags(t) for t in self._tokenizer.get_added_tokens_decoder().values()}
        decoder = self._init_kwargs.get("added_tokens_decoder") or {}
        wanted = [AddedToken(**{k: v for k, v in decoder[i].items() if k in FLAGS}) for i in sorted(decoder, key=int)]
        to_add = [t for t in wanted if flags(t) not in held]
        known = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()} | {t.content for t in to_add}
        specials = self._special_tokens()
        to_add += [
            AddedToken(**{**{k: v for k, v in t.items() if k in FLAGS}, "special": True})
            if isinstance(t, dict)
            else AddedToken(t, special=True)
            for t in specials
            if _content(t) not in known
        ]
        special_texts = {_content(t) for t in specials}
        for token in to_add:
            token.special = token.special or token.content in special_texts
        if to_add:
            self._tokenizer.add_tokens(to_add)

    def _token_id(self, token: Any) -> int | None:
        """transformers' `convert_tokens_to_ids`: a missing token reads as the unk token's id."""
        content = _content(token)
        if content is None:
            return None
        found = self._tokenizer.token_to_id(content)
        if found is None and content != _content(self._init_kwargs.get("unk_token")):
            return self._token_id(self._init_kwargs.get("unk_token"))
        return found

    def _set_template(self) -> None:
        """LlamaTokenizerFast / GemmaTokenizerFast `update_post_processor`."""
        from tokenizers import processors  # pylint: disable=import-outside-toplevel

        bos, eos = (_content(self._init_kwargs.get(k)) for k in ("bos_token", "eos_token"))
        add_bos, add_eos = (bool(self._init_kwargs.get(k)) for k in ("add_bos_token", "add_eos_token"))
        for add, token, name in ((add_bos, bos, "bos"), (add_eos, eos, "eos")):
            if add and token is None:
                raise ConfigError(
                    f"{self.files[TOKENIZER_CONFIG]}: add_{name}_token is true but {name}_token is "
                    f"null; set {name}_token or add_{name}_token=false."
                )
        single = f"{f'{bos}:0 ' if add_bos else ''}$A:0{f' {eos}:0' if add_eos else ''}"
        pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
        special = [
            (token, self._ids[f"{name}_token"])
            for add, token, name in ((add_bos, bos, "bos"), (add_eos, eos, "eos"))
            if add
        ]
        self._tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def _prompt_special_ids(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ids the post-processor puts before and after a text's ids."""
        probe = "a b"
        plain = self.encode_continuation(probe)
        full = self.encode_prompt(probe)
        for start in range(len(full) - len(plain) + 1 if plain else 0):
            if full[start : start + len(plain)] == plain:
                return tuple(full[:start]), tuple(full[start + len(plain) :])
        raise ConfigError(
            f"The post-processor of {self.directory} rewrites a text's ids rather than adding "
            "special tokens around them; cat_jax cannot split its prompts."
        )

    # ---- what a vocabulary offers ----

    @property
    def settings(self) -> dict[str, Any]:
        """The resolved configuration that decides tokenization (hashed into the identity)."""
        keys = SPECIAL_KEYS + (
            "additional_special_tokens",
            "clean_up_tokenization_spaces",
            "split_special_tokens",
            "add_prefix_space",
            "legacy",
        )
        keys += ("add_bos_token", "add_eos_token") if self._templates else ()
        settings: dict[str, Any] = {"tokenizer_class": self._class_name}
        for key in keys:
            value = self._init_kwargs.get(key)
            settings[key] = (
                [_content(t) for t in value] if key == "additional_special_tokens" and value else _content(value)
            )
        decoder = self._init_kwargs.get("added_tokens_decoder") or {}
        settings["added_tokens_decoder"] = {
            str(i): {k: v for k, v in decoder[i].items() if k in FLAGS} for i in sorted(decoder, key=int)
        }
        return settings

    @property
    def tokenizer_class(self) -> str:
        """The transformers fast class the files name (e.g. "LlamaTokenizerFast")."""
        return self._class_name

    @property
    def backend_tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer` applied (transformers' `tokenizer.backend_tokenizer`)."""
        return self._tokenizer

    @property
    def eos_id(self) -> int | None:
        """The tokenizer's eos token (else generation_config's first eos id)."""
        if self._ids["eos_token"] is not None:
            return self._ids["eos_token"]
        ids = self.generation_eos_ids
        return ids[0] if ids else None

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos_token"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk_token"]

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def tokenizer_pad_id(self) -> int | None:
        """The tokenizer's own pad token (not used for padding: see the module doc)."""
        return self._ids["pad_token"]

    @property
    def generation_eos_ids(self) -> tuple[int, ...]:
        """generation_config.json's eos_token_id (one id or a list)."""
        ids = self._generation.get("eos_token_id")
        return tuple(int(i) for i in (ids if isinstance(ids, list) else [] if ids is None else [ids]))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids generation stops at: eos_id and generation_config.json's eos_token_id(s)."""
        eos = [self.eos_id] if self.eos_id is not None else []
        return tuple(dict.fromkeys(eos + list(self.generation_eos_ids)))

    @property
    def extra_ids(self) -> int:
        return 0

    @property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer has (transformers' len(tokenizer) without holes)."""
        return self._size

    def encode_prompt(self, text: str | bytes) -> list[int]:
        """`tokenizer(text)["input_ids"]`: the ids with the prompt's special tokens (e.g. BOS)."""
        return list(self._tokenizer.encode(_text(text), add_special_tokens=True).ids)

    def encode_continuation(self, text: str | bytes) -> list[int]:
        """`tokenizer(text, add_special_tokens=False)["input_ids"]`."""
        return list(self._tokenizer.encode(_text(text), add_special_tokens=False).ids)

    encode = encode_continuation

    def decode(self, ids: Iterable[int]) -> str:
        """`tokenizer.decode(ids, skip_special_tokens=True)` of the ids up to the first stop id;
        ids outside [0, vocab_size) are dropped."""
        stops = set(self.stop_ids)
        kept = []
        for i in (int(i) for i in ids):
            if 0 <= i < self._size:
                kept.append(i)
            if i in stops:
                break
        text = self._tokenizer.decode(kept, skip_special_tokens=True)
        return clean_up_tokenization(text) if self._init_kwargs.get("clean_up_tokenization_spaces") else text

    def write_files(self, directory: str) -> list[str]:
        """Copy the tokenizer files into `directory` (atomically each); returns their names."""
        for name, path in self.files.items():
            target = os.path.join(directory, name)
            tmp = f"{target}.tmp.{os.getpid()}"
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                dst.write(src.read())
            os.replace(tmp, target)
        return list(self.files)

    def __eq__(self, other: object) -> bool:
        """Equal when they tokenize alike (the same identity), wherever their files are."""
        return isinstance(other, HFTokenizerVocabulary) and other.tokenizer_sha256 == self.tokenizer_sha256

    def __hash__(self) -> int:
        return hash(self.tokenizer_sha256)

    def __repr__(self) -> str:
        return f"cat_jax.hf_tokenizer.HFTokenizerVocabulary({self.directory!r})"


def _text(text: str | bytes) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else text
