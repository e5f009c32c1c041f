"""Train the bundled example model (a BatchNorm CNN on scikit-learn's digits) and save its state_dict.

python examples/train_digits_cnn.py digits_cnn.pt
cosconvert digits_cnn.pt --arch cosconvert.demo:DigitsCNN --data digits --strip-norms fold --epochs 3
"""

import sys

import torch

from cosconvert.demo import accuracy, train_digits_cnn

if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "digits_cnn.pt"
    model = train_digits_cnn()
    torch.save(model.state_dict(), path)
    print(f"saved {path}: test accuracy {accuracy(model):.2f}%")
