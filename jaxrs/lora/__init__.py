"""Low-rank adapters (peft's LoRA format) served per request over one base model: reading adapters
(`adapter`), the fixed slots their weights occupy in the model's parameters (`slots`), and the weight
that applies them in a linear layer (`weight`)."""
