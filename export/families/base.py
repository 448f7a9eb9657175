"""What a model family spec states, and the helpers towers of several families share.

A ``FamilySpec`` is to clipfast what an ``OnnxConfig`` subclass is to optimum: everything the
export needs to know about one family, in one place -

- which sources it claims (``model_types`` for ``transformers:`` checkpoints, ``claims_open_clip``
  for open_clip configs) and the manifest's family label (``label``);
- its towers (``build_towers`` for transformers models; open_clip models use open_clip's own
  ``encode_image`` / ``encode_text`` behind ``sources_openclip``'s wrappers) and their pooling;
- the attention pattern ONNX Runtime's fusion should match (``attention``): the
  ``optimize_model`` model type and sizes per tower, or why the tower cannot be fused;
- the block names its exported nodes carry (``layer_names``), which int8 quantization uses to
  group nodes per block;
- its preprocessing and tokenizer readers (``preprocess`` / ``tokenizer``).

Nothing here imports torch at import time (``clipfast models`` and ``clipfast.cli`` read the
registry without the export extras).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

__all__ = ["AttentionSpec", "FamilySpec", "TowerParts"]


@dataclass(frozen=True)
class AttentionSpec:
    """What ORT's fusion needs to know about a tower, and how many Attention nodes to expect.

    model_type: ``optimize_model``'s model type ("clip" for CLIP-style ViT and text towers,
    "bert" for BERT text towers); layers: transformer blocks (= expected fused Attention nodes).
    """

    model_type: str
    layers: int
    num_heads: int
    hidden_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TowerParts:
    """A transformers family's towers for one loaded model (``FamilySpec.build_towers``).

    logits: ``{"kind", "scale", "bias"}`` (LogitsConfig fields); architecture: what the manifest
    records about the sizes and pooling.
    """

    image_tower: nn.Module
    text_tower: nn.Module
    text_inputs: tuple[str, ...]
    embed_dim: int
    logits: dict[str, Any]
    architecture: dict[str, Any] = field(default_factory=dict)


def config_sizes(cfg: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """``{key: cfg.key}`` for the keys the config sets (not None)."""
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}


VIT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "patch_size", "image_size", "hidden_act")
TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "max_position_embeddings", "hidden_act")


def hf_attention(config: Any, model_type: str) -> AttentionSpec:
    """AttentionSpec from a transformers encoder config (num_hidden_layers, heads, width)."""
    return AttentionSpec(model_type, int(config.num_hidden_layers),
                         int(config.num_attention_heads), int(config.hidden_size))


class FamilySpec:
    """One model family. Subclass it in a module of ``clipfast.export.families`` and decorate
    the class with ``@register``: that module is all a new family needs.

    Class attributes:
        name: registry key (unique). label: the manifest's ``family`` value for models of this
        family (may be refined per model by ``label_for``). loader: "transformers" or
        "open_clip". model_types: transformers ``config.model_type`` values it builds.
        priority: among specs that claim the same source, the highest wins (a specific family
        over a generic one). default_context: text length when the tokenizer states none.
        image_pooling / text_pooling: how each tower pools, in words (the manifest and
        ``clipfast models`` show it). layer_names: module-path names of the blocks in exported
        node names ("resblocks" for "/transformer/resblocks.3/..."), for quantization.
        summary: one line for ``clipfast models``.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    loader: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    priority: ClassVar[int] = 0
    default_context: ClassVar[int | None] = None
    image_pooling: ClassVar[str] = ""
    text_pooling: ClassVar[str] = ""
    layer_names: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    # open_clip configs this family covers, for `clipfast models` and the coverage table
    examples: ClassVar[tuple[str, ...]] = ()

    # -- which sources ------------------------------------------------------------------------
    def claims_transformers(self, model_type: str, config: Any, name: str) -> bool:
        """True for a transformers model this family builds (default: by model_type)."""
        return model_type in self.model_types

    def claims_open_clip(self, model_name: str, cfg: dict[str, Any]) -> bool:
        """True for an open_clip config (``open_clip.get_model_config``) of this family."""
        return False

    def label_for(self, model_name: str, pretrained: str) -> str:
        """The manifest family of one model (open_clip name + pretrained tag, or hub id)."""
        return self.label

    # -- towers -------------------------------------------------------------------------------
    def build_towers(self, model: nn.Module, name: str) -> TowerParts:
        """transformers families: wrap a loaded dual encoder (eval, fp32) into export towers."""
        raise NotImplementedError(f"family {self.name} does not build transformers towers")

    def owns_tower(self, tower: nn.Module) -> bool:
        """True when ``tower`` (a SourceModel tower) was built by this family."""
        return False

    # -- sequence length ------------------------------------------------------------------------
    def text_padding_free(self, tower: nn.Module) -> tuple[bool, str]:
        """``(True, why)`` when the text tower's result provably does not depend on trailing
        padding (causal attention with end-token pooling, or an attention mask), so that the
        export may give it a dynamic sequence axis; ``(False, why not)`` keeps the fixed
        length. The export also checks the claim on the source tower, and the artifact's golden
        self-check (short and long texts) checks it again at load."""
        return False, f"family {self.name} does not declare its text tower padding-independent"

    # -- fusion -------------------------------------------------------------------------------
    def attention(self, tower: nn.Module, which: str) -> tuple[AttentionSpec | None, str | None]:
        """``(spec, None)`` when ORT can fuse ``tower``'s attention, else ``(None, reason)``."""
        return None, f"family {self.name} declares no fusable attention"

    def random_init(self, model: nn.Module, transform: Any) -> list[str]:
        """``--pretrained none``: make the freshly initialised ``model`` behave like a trained
        one where the library's own init leaves it degenerate (all inputs -> nearly one
        embedding, so the centred error is ill-conditioned). ``transform``: the reference image
        transform (PIL -> (3, H, W) float32), for calibration. Returns what it changed, for the
        manifest (default: nothing)."""
        return []

    # -- readers ------------------------------------------------------------------------------
    def preprocess(self, source: Any) -> tuple[Any, Any]:
        """``(PreprocessConfig, reference transform)`` from the source's processor / model."""
        raise NotImplementedError

    def tokenizer(self, source: Any, context_length: int, text_inputs: tuple[str, ...]
                  ) -> tuple[Any, str, Any]:
        """``(TokenizerConfig, tokenizer.json text, reference tokenize)``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ``clipfast models --json`` prints about the family."""
        return {"name": self.name, "label": self.label, "loader": self.loader,
                "model_types": list(self.model_types), "image_pooling": self.image_pooling,
                "text_pooling": self.text_pooling, "layer_names": list(self.layer_names),
                "summary": self.summary}
