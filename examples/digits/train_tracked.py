"""Train a small CNN on scikit-learn's digits: the plain script, not instrumented.

    python examples/digits/train.py --steps 2000

train_tracked.py is the same script watched live with the tensorwire SDK
(``diff examples/digits/train.py examples/digits/train_tracked.py``: 6 lines).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from digits import DigitsCNN, load_digits_split

import tensorwire


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = load_digits_split()
    params = {"learning_rate": 1e-3, "batch_size": 64}
    model = DigitsCNN()
    run = tensorwire.init(task="digits-cnn", params=params)
    optimizer = torch.optim.Adam(model.parameters(), lr=params["learning_rate"])
    step = 0
    while step < args.steps and not run.should_stop:
        step += 1
        for group in optimizer.param_groups:
            group["lr"] = params["learning_rate"]
        batch = torch.randint(0, len(x_train), (int(params["batch_size"]),))
        logits = model(x_train[batch])
        loss = F.cross_entropy(logits, y_train[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = (logits.argmax(1) == y_train[batch]).float().mean()
        run.log(step, loss=loss, accuracy=accuracy)
        run.wait_if_paused()
    with torch.no_grad():
        test_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"step {step}: loss {loss.item():.4f}, batch accuracy {accuracy.item():.3f}, "
          f"test accuracy {test_accuracy:.3f}")
    run.checkpoint(model, name="digits-cnn", inputs=x_test[:8]).result()


if __name__ == "__main__":
    main()
