"""The error of a setting's text that does not parse or does not fit the teacher (an encoding, a
compression, an augmentation recipe): a user error, shown by the CLI as one line (cli/main.py).
A ValueError, so callers that catch ValueError (plan, bench fidelity) keep working."""


class SpecError(ValueError):
    pass
