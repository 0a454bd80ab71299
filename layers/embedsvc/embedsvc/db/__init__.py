"""The content store's schema: versioned SQL migrations (sql/NNNN_name.sql) and the code that applies them."""
