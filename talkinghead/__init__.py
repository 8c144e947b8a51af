"""The `talkinghead` command line: one entry point whose subcommands live beside the code they run."""
