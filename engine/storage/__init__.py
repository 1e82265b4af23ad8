"""The store: its format (store), chunk writes (writer, checksums), lease, locations, backup, verify, export."""
