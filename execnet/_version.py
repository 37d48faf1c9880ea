# The API level is execnet 2.1.2's; the local label names this engine.
version = "2.1.2+native"
