"""Small pieces every room may use: whole-or-nothing files, the settings-text error, the thread default, the crash tests' kill points."""
