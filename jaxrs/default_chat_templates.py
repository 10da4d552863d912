"""Chat formats for architectures whose files may ship without a chat template.

Some converted files (GGUFs especially) drop the template the model was tuned with. For families with one
fixed turn format we know it, so chat still renders the prompt the model expects, and the token that ends
a turn still ends generation.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str  # Jinja, rendered like a model's own (see `jaxrs.chat_template`)
    end_of_turn: str  # the token text that closes the model's turn: generation stops there


# Gemma's turn format (as in Gemma 3's own template): no system role, so a system message is written at
# the top of the first user turn; the assistant's role is called "model"; content is trimmed.
_GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for part in message['content'] if part['type'] == 'text' -%}
            {{ part['text'] | trim }}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}"""

_GEMMA = ChatFormat("gemma", _GEMMA_TEMPLATE, "<end_of_turn>")

_BY_ARCHITECTURE = {"gemma": _GEMMA, "gemma2": _GEMMA, "gemma3": _GEMMA}


def default_chat_format(architecture: str | None) -> ChatFormat | None:
    """The built-in chat format of an architecture (`general.architecture`), None if it has none."""
    return _BY_ARCHITECTURE.get(architecture or "")
