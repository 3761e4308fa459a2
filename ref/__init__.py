"""Reference implementation of Internal Guidance and InnerControl: the library (imports nothing from toy/ or the scripts)."""
