"""A training loop with gradient accumulation, written as most loops are: step(model, optimizer, batch).

    planner dryrun examples/steps/accumulation_loop.py:step --model llama-3.2-1b --batch 8 --seq 1024

The batch (8 sequences here) is split into micro-batches of 2; each micro-batch's loss is scaled and
backpropagated; the loss is logged with `.item()` (a host read: the dry run answers it from a narrow
real run of the same function); then one optimizer step. The plan's --batch is the whole batch, so the
catalog estimate beside it (sft at batch 8, one micro-batch) shows what accumulation saves.
"""

MICRO = 2


def step(model, optimizer, batch):
    ids = batch["input_ids"]
    chunks = ids.split(MICRO)
    total = 0.0
    for micro in chunks:
        out = model(input_ids=micro, labels=micro)
        (out.loss / len(chunks)).backward()
        total += out.loss.item() / len(chunks)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total
