"""The coordinator: service, ledger, scheduler, folding and store (see DESIGN.md)."""
