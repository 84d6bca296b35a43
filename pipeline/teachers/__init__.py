"""Teachers: checkpoint files and their identity, and the `teachers` stage that trains or imports them."""
