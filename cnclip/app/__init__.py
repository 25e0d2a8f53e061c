"""What users run: the `cnclip` command line, the HTTP server and its web page, contact sheets."""
