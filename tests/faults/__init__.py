"""The fault suite of issue 9: hostile inputs built by each test from a table; refusals change nothing."""
