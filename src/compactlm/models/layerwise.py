"""Models bigger than memory: a safetensors checkpoint run one decoder layer at a time (`memory_gb`).

`Layerwise(checkpoint, dtype)` builds the model's skeleton without weights (parameters on the meta device;
buffers such as rotary frequencies are real), and memory-maps what lies outside the decoder layers
(embeddings, positions, final norm, and the LM head when asked) from the shards. `run(batches, on_batch)`
passes every batch through layer 0, then every batch through layer 1, and so on: one layer holds real weights
at a time, read from its shard and dropped after its pass, and the hidden states between layers stay in
memory or, above `spill_bytes`, in files. Each layer is called with the arguments the whole model passes it
(masks and rotary embeddings captured from the model's own forward), so it computes exactly what it computes
inside the whole model: same weights, same inputs, same kernels. Module hooks registered on the skeleton
(importance collectors, Block Importance) fire as in a full forward, and results are bit-identical to the
in-memory path on CPU.

This is how GPTQ-style calibrators (AutoGPTQ, llm-compressor) handle models larger than one device.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from compactlm.errors import CompactLMError
from compactlm.models.family import family_of, get_module
from compactlm.models.loading import remote_code
from compactlm.models.shards import Shards

log = logging.getLogger(__name__)

OnBatch = Callable[[int, dict[str, Tensor]], None]  # (batch index, model inputs) before each layer call


def _return_big_frees() -> None:
    """Make glibc hand every tensor of 1 MB or more back to the system when it is freed.

    By default glibc raises its mmap threshold to the size of each big block freed (up to 32 MB), so later
    tensors of a layer come from a heap that does not shrink: on a 1.24B model scored layer by layer the peak
    RSS grew by 25 MB per layer. A fixed threshold (mallopt M_MMAP_THRESHOLD) keeps it flat. Elsewhere (not
    glibc) this does nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def model_inputs(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A batch's input_ids and attention_mask on `device`, ready for a forward without cache."""
    if "input_ids" not in batch:
        raise CompactLMError("a batch has no 'input_ids'")
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    return {"input_ids": ids, "attention_mask": mask}


def _set_params(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Replace the parameters named (relative to `module`) by `tensors`, as frozen parameters."""
    for name, tensor in tensors.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = get_module(module, owner_path) if owner_path else module
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _cast_output(dtype: torch.dtype):
    """A forward hook: an embedding's rows, looked up in the file's dtype, cast to the compute dtype. A scaled
    embedding (Gemma's, times sqrt(hidden)) is scaled after the cast, as the converted table would be: its own
    forward scales in the file's dtype first (a bf16 rounding the loaded model never makes)."""

    def hook(module, args, output):
        scale = getattr(module, "embed_scale", None)
        if scale is None:
            return output.to(dtype)
        return nn.functional.embedding(args[0], module.weight, module.padding_idx).to(dtype) * scale.to(dtype)

    return hook


class _LazyTensors(Mapping):
    """name -> tensor, each produced by `get` when looked up (nothing kept)."""

    def __init__(self, names: list[str], get: Callable[[str], Tensor]):
        self.names, self._get = names, get
        self._known = set(names)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class _Catch(nn.Module):
    """Stands in for decoder layer `i` during the capture forward: records its arguments, passes hidden on."""

    def __init__(self, i: int, calls: dict[int, tuple]):
        super().__init__()
        self.i, self.calls = i, calls

    def forward(self, hidden, *args, **kwargs):
        self.calls[self.i] = (hidden, args, kwargs)
        return hidden


class _States:
    """Hidden states of each batch between layers: in memory, or in files once they pass `spill_bytes`."""

    def __init__(self, spill_bytes: int | None):
        self.spill_bytes = spill_bytes
        self.items: list[Tensor | Path] = []
        self.bytes = 0
        self._dir: Path | None = None

    def _spill(self, i: int, tensor: Tensor) -> Tensor | Path:
        nbytes = tensor.numel() * tensor.element_size()
        if self.spill_bytes is None or self.bytes + nbytes <= self.spill_bytes:
            self.bytes += nbytes
            return tensor
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="compactlm-states."))
            log.info("layer by layer: hidden states beyond %.2f GB go to %s", self.spill_bytes / 2**30, self._dir)
        path = self._dir / f"{i}.pt"
        torch.save(tensor, path)
        return path

    def append(self, tensor: Tensor) -> None:
        self.items.append(self._spill(len(self.items), tensor))

    def __getitem__(self, i: int) -> Tensor:
        item = self.items[i]
        return torch.load(item, weights_only=True) if isinstance(item, Path) else item

    def __setitem__(self, i: int, tensor: Tensor) -> None:
        item = self.items[i]
        if isinstance(item, Path):
            torch.save(tensor, item)
        else:
            self.items[i] = tensor

    def __len__(self) -> int:
        return len(self.items)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class Layerwise:
    """A checkpoint's model with one decoder layer's weights resident at a time (see the module docstring).

    `model` is the skeleton: its config, family paths and hooks work as on a loaded model; its decoder layers
    hold meta parameters except inside `run`.
    """

    def __init__(self, checkpoint: str | Path, dtype: torch.dtype = torch.float32, *, head: bool = False,
                 spill_bytes: int | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        _return_big_frees()
        self.shards = Shards(checkpoint)
        config = AutoConfig.from_pretrained(checkpoint, **remote_code())
        self.family = family_of(config)
        self.dtype = dtype
        self.spill_bytes = spill_bytes
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) real
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.layers = get_module(self.model, self.family.layers_path)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self._outside(head)

    def _outside(self, head: bool) -> None:
        """Give the parameters outside the decoder layers their weights (the LM head only when `head`).

        Embedding tables stay memory-mapped in the file's dtype (a lookup reads only its rows) and their
        output is cast to the compute dtype: the same numbers as looking up in a converted table."""
        prefix = self.family.layers_path + "."
        head_name = self.family.lm_head_path + ".weight"
        for name, _ in list(self.model.named_parameters(remove_duplicate=False)):
            if name.startswith(prefix) or name == head_name:
                continue
            tensor = self.shards.mapped(name)
            module = get_module(self.model, name.rpartition(".")[0])
            if tensor.dtype != self.dtype:
                if isinstance(module, nn.Embedding):
                    module.register_forward_hook(_cast_output(self.dtype))
                else:
                    tensor = tensor.to(self.dtype)
            _set_params(self.model, {name: tensor})
        if not head:
            return
        embed = get_module(self.model, self.family.embed_path).weight
        if self.tied and embed.dtype == self.dtype:
            _set_params(self.model, {head_name: embed})  # the same tensor, as in the loaded model
        else:
            source = self.family.embed_path + ".weight" if self.tied else head_name
            _set_params(self.model, {head_name: self.shards.mapped(source).to(self.dtype)})

    @property
    def config(self):
        """The model's Hugging Face config (so `family_of` and shape checks read a Layerwise like a model)."""
        return self.model.config

    def head(self) -> tuple[Tensor, Tensor | None]:
        """The LM head's (weight, bias) in the compute dtype (memory-mapped when the file has that dtype)."""
        module = get_module(self.model, self.family.lm_head_path)
        if module.weight.is_meta:
            raise CompactLMError("Layerwise: built without its LM head (pass head=True)")
        return module.weight, module.bias

    def parameters_from_shards(self) -> Mapping[str, Tensor]:
        """Every parameter (a tied LM head once, as the embedding) by name, memory-mapped when looked up."""
        head = self.family.lm_head_path + ".weight"
        names = [name for name, _ in self.model.named_parameters() if not (self.tied and name == head)]
        return _LazyTensors(names, self.shards.mapped)

    def layer_bytes(self) -> int:
        """Bytes of the largest decoder layer's weights in the compute dtype."""
        return max(sum(p.numel() for p in layer.parameters()) for layer in self.layers) * self.dtype.itemsize

    def _load_layer(self, i: int) -> None:
        prefix = f"{self.family.layers_path}.{i}."
        names = [name for name, _ in self.layers[i].named_parameters()]
        _set_params(self.layers[i], {n: self.shards.read(prefix + n, self.dtype) for n in names})

    def _unload_layer(self, i: int) -> None:
        layer = self.layers[i]
        _set_params(layer, {n: torch.empty_like(p, device="meta") for n, p in layer.named_parameters()})

    def run(self, batches: Iterable[dict[str, Tensor]], on_batch: OnBatch | None = None,
            progress: bool = False) -> _States:
        """Every batch through every decoder layer, layer-major; the last layer's outputs (before the final
        norm). `on_batch(b, inputs)` runs before each layer call of batch b (e.g. to give hooks the mask)."""
        from tqdm.auto import tqdm

        inputs = [model_inputs(batch, torch.device("cpu")) for batch in batches]
        with torch.no_grad():
            states, _ = capture_layer_calls(self.model, inputs, self.spill_bytes, keep_calls=False)
            try:
                for i in tqdm(range(len(self.layers)), desc="layers", unit="layer", disable=not progress):
                    self._load_layer(i)
                    try:
                        for b, batch in enumerate(inputs):
                            if on_batch is not None:
                                on_batch(b, batch)
                            # the masks and rotary tables are rebuilt for each call rather than kept for every
                            # batch: 4-D masks (B, 1, S, S) can outweigh the hidden states the budget counts
                            args, kwargs = capture_layer_calls(self.model, [batch])[1][0][i]
                            out = self.layers[i](states[b], *args, **kwargs)
                            states[b] = out[0] if isinstance(out, tuple) else out
                    finally:
                        self._unload_layer(i)
            except BaseException:
                states.close()
                raise
        return states

    def final_hidden(self, batches: Iterable[dict[str, Tensor]], progress: bool = False) -> Iterator[Tensor]:
        """Each batch's final hidden states (after the final norm), as `base(...).last_hidden_state` gives them."""
        norm = get_module(self.model, self.family.final_norm_path)
        states = self.run(batches, progress=progress)
        try:
            with torch.no_grad():
                for b in range(len(states)):
                    yield norm(states[b])
        finally:
            states.close()


def capture_layer_calls(model: nn.Module, inputs: list[dict[str, Tensor]], spill_bytes: int | None = None,
                        keep_calls: bool = True) -> tuple[_States, list[dict[int, tuple]]]:
    """Each batch's input to decoder layer 0, and the other arguments (masks, rotary embeddings, ...) that the
    model passes every layer (none when not `keep_calls`), from one forward of the decoder with each layer
    replaced by a catcher. Works on a loaded model and on a `Layerwise` skeleton alike (no layer weight is used)."""
    family = family_of(model)
    base = get_module(model, family.base_path)
    layers = get_module(model, family.layers_path)
    originals = list(layers)
    states, calls = _States(spill_bytes), []
    try:
        for i in range(len(originals)):
            layers[i] = _Catch(i, {})
        for batch in inputs:
            for catcher in layers:
                catcher.calls.clear()
            base(**batch, use_cache=False)
            states.append(layers[0].calls[0][0])
            if keep_calls:
                calls.append({i: c.calls[i][1:] for i, c in enumerate(layers)})
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return states, calls


def skeleton(model) -> nn.Module:
    """The nn.Module behind `model` (a loaded model, or a `Layerwise`'s skeleton): config, paths, hooks."""
    return model.model if isinstance(model, Layerwise) else model


def decoder_passes(model, batches: Iterable[dict[str, Tensor]], on_batch: OnBatch, *, progress: bool = False,
                   desc: str = "forward") -> None:
    """Run the decoder (no LM head, no grad, eval mode) over `batches` for the hooks registered on it: a loaded
    model one batch at a time, a `Layerwise` one layer at a time. `on_batch(b, inputs)` runs before batch b
    enters the decoder (a Layerwise: before each of its layer calls)."""
    from tqdm.auto import tqdm

    if isinstance(model, Layerwise):
        model.run(batches, on_batch, progress=progress).close()
        return
    family = family_of(model)
    base = get_module(model, family.base_path)  # the decoder without the LM head: hooks never need logits
    device = get_module(model, family.embed_path).weight.device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress)):
                inputs = model_inputs(batch, device)
                on_batch(b, inputs)
                base(**inputs, use_cache=False)
    finally:
        model.train(was_training)
