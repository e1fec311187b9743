"""shadowgate router: the data plane that splits, mirrors and records model traffic."""
