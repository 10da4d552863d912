"""The prompt shapes `LLM.generate` takes, vLLM's among them: a string, a list of token ids, a `TextPrompt`
(`{"prompt": text}`) or a `TokensPrompt` (`{"prompt_token_ids": ids}`), either dict with
`multi_modal_data={"image": image or [images]}` for a vision-language model (a `TokensPrompt` may carry
its `prompt` text too: the ids are fed, the text reported), and either with vLLM's `cache_salt` (only
prompts with the same salt share prefix-cache blocks). Text is tokenized as a plain
prompt is (the tokenizer's BOS added); each image needs its place in the prompt, the model's marker
(`<image>`, `<|image_1|>`) in the text or the marker's token ids in the ids, as vLLM's prompts do."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from jaxrs.errors import JaxrsError
from jaxrs.vision.chat import load_images
from jaxrs.vision.encoder import VisionModel
from jaxrs.vision.media import ImageError, MediaPolicy
from jaxrs.vision.prompt import ImagePrompt, assemble_prompt, place_images

Prompt = str | list[int] | Mapping[str, Any]
PROMPT_KEYS = ("prompt", "prompt_token_ids", "multi_modal_data", "cache_salt")


@dataclasses.dataclass
class PromptInput:
    """One prompt ready for the engine: its text (None when given as ids), token ids, placed images and
    prefix-cache salt."""

    text: str | None
    ids: list[int]
    images: ImagePrompt | None = None
    cache_salt: str | None = None


def is_one_prompt(prompts: object) -> bool:
    """Whether `generate`'s argument is a single prompt rather than a list of them."""
    return isinstance(prompts, str | Mapping) or (
        isinstance(prompts, Sequence) and bool(prompts) and isinstance(prompts[0], int)
    )


def prompt_input(
    prompt: Prompt, tokenizer: Any, vision: VisionModel | None, policy: MediaPolicy
) -> PromptInput:
    """`prompt` tokenized, its images (if any) loaded, preprocessed and placed. Raises JaxrsError naming
    what is wrong: an unknown key, neither text nor ids, images for a text-only model, images without
    their markers."""
    if isinstance(prompt, str):
        return PromptInput(prompt, tokenizer.encode(prompt))
    if not isinstance(prompt, Mapping):
        return PromptInput(None, [int(t) for t in prompt])
    unknown = sorted(set(prompt) - set(PROMPT_KEYS))
    if unknown:
        raise JaxrsError(f"unsupported prompt keys {unknown} (supported: {', '.join(PROMPT_KEYS)})")
    return dataclasses.replace(
        _mapped_input(prompt, tokenizer, vision, policy), cache_salt=prompt.get("cache_salt")
    )


def _mapped_input(
    prompt: Mapping[str, Any], tokenizer: Any, vision: VisionModel | None, policy: MediaPolicy
) -> PromptInput:
    text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
    if text is None and ids is None:
        raise JaxrsError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
    sources = _image_sources(prompt.get("multi_modal_data"))
    if not sources:  # ids win over text, which a TokensPrompt may carry beside them to be reported
        return PromptInput(text, tokenizer.encode(text)) if ids is None else PromptInput(text, list(ids))
    if vision is None:
        raise ImageError("multi_modal_data holds images; this model is text-only")
    images = load_images(sources, vision, policy)
    if ids is not None:
        marker_ids = tokenizer.encode(vision.marker, add_special_tokens=False)
        return PromptInput(text, *place_images(list(ids), marker_ids, images))
    return PromptInput(text, *_text_with_images(tokenizer, text, vision, images))


def _image_sources(data: object) -> list[object]:
    if data is None:
        return []
    if not isinstance(data, Mapping) or set(data) - {"image"}:
        raise JaxrsError("multi_modal_data takes {'image': an image or a list of images}")
    image = data.get("image")
    if image is None:
        return []
    return list(image) if isinstance(image, list | tuple) else [image]


def _text_with_images(
    tokenizer: Any, text: str, vision: VisionModel, images: list[Any]
) -> tuple[list[int], ImagePrompt]:
    """The text's ids with the images placed at its markers and BOS first, as a plain prompt gets it (a
    processor that assembles prompts its own way adds BOS as its reference does)."""
    ids, placed = assemble_prompt(tokenizer, text, vision, images)
    if getattr(vision.processor, "assemble", None) is not None or not tokenizer.add_bos:
        return ids, placed
    if ids and ids[0] == tokenizer.bos_token_id:
        return ids, placed
    return [tokenizer.bos_token_id, *ids], ImagePrompt([(at + 1, im) for at, im in placed.spans])
