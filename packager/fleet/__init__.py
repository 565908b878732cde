"""Roll a bundle out to many offline servers with Ansible (`pack fleet`)."""
