"""The Metal emulator: `from metal_emu import emu` (see README.md)."""
