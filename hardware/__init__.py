"""What the machine's devices can do, and every choice that follows from it (``capabilities``)."""
