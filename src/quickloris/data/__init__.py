"""Training data: JSONL loading, chat templates, response-only masking, packing, embedded tasks.

No transformers import here: tokenizers are objects passed in (anything with Hugging Face's tokenizer
call / ``apply_chat_template`` interface).

* `quickloris.data.jsonl`   -- read and validate ``messages`` / ``prompt``+``completion`` JSONL records
* `quickloris.data.chat`    -- tokenize with the chat template, labels -100 outside assistant turns
* `quickloris.data.packing` -- padding-free packing, right-padding collator, resumable batch plans
* `quickloris.data.tasks`   -- the embedded tasks (generated, held-out split, exact-match scoring)
* `quickloris.data.tools`   -- tool calling: OpenAI-format tools / tool_calls / results, template checks, call parsing
* `quickloris.data.tool_task` -- the embedded tool-calling task (`--task tools`)
* `quickloris.data.config`  -- `DataConfig` (CLI options) and `prepare_data`
"""
