"""Chat prompts: the checkpoint's own chat template (`tokenizer_config.json`'s `chat_template`), rendered as Hugging
Face transformers does (sandboxed Jinja2, trim_blocks and lstrip_blocks, `raise_exception`, `tojson`,
`add_generation_prompt=True`, the config's `bos_token` and `eos_token`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsv4.errors import DSV4Error

TOKENIZER_CONFIG = "tokenizer_config.json"


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2 import TemplateError

        def raise_exception(message: str) -> None:
            raise DSV4Error(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise DSV4Error(f"{TOKENIZER_CONFIG}: the chat_template is not valid Jinja2: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for `messages`, without a leading BOS token text (dsv4 puts the BOS id first itself)."""
        from jinja2 import TemplateError
        try:
            text = self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                         eos_token=self.eos_token)
        except TemplateError as e:
            raise DSV4Error(f"the chat template failed on these messages: {e}") from None
        return text.removeprefix(self.bos_token) if self.bos_token else text


def load_template(model_dir: Path | None) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none."""
    path = None if model_dir is None else Path(model_dir) / TOKENIZER_CONFIG
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DSV4Error(f"{path}: not readable JSON ({e})") from None
    source = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(source, list):       # named templates: take the default one
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if source is None:
        return None
    if not isinstance(source, str):
        raise DSV4Error(f"{path}: chat_template must be a string")
    return ChatTemplate(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
