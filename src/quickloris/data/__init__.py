"""Training data: data files, record shapes, chat templates, response-only masking, packing, embedded tasks.

No transformers import here: tokenizers are objects passed in (anything with Hugging Face's tokenizer
call / ``apply_chat_template`` interface); ``datasets`` / pyarrow are imported only to read CSV, Parquet, Arrow.

* `quickloris.data.sources`  -- data files read row by row (JSON lines / arrays, gzip, CSV, Parquet, Arrow, folders)
* `quickloris.data.shapes`   -- record shapes (messages, prompt_completion, alpaca, sharegpt, text), column mapping
* `quickloris.data.jsonl`    -- the canonical `Record` and its checks; the records of one file
* `quickloris.data.records`  -- several files as one stream, with what each held
* `quickloris.data.chat`     -- tokenize with the chat template, labels -100 outside assistant turns
* `quickloris.data.pipeline` -- tokenize a stream of records (worker processes, progress bar)
* `quickloris.data.packing`  -- padding-free packing, right-padding collator, resumable batch plans
* `quickloris.data.tasks`    -- the embedded tasks (generated, held-out split, exact-match scoring)
* `quickloris.data.tools`    -- tool calling: OpenAI-format tools / tool_calls / results, template checks, call parsing
* `quickloris.data.tool_task` -- the embedded tool-calling task (`--task tools`)
* `quickloris.data.config`   -- `DataConfig` (CLI options) and `prepare_data`
"""
