-- Column names and DuckDB types of a Parquet file (or of the union of a shard glob).
-- $path  the file or glob
SELECT column_name, column_type
FROM (DESCRIBE SELECT * FROM read_parquet($path))
