-- Every column of a Parquet file or shard glob; the body of the published views.
-- $path  the file or glob
SELECT * FROM read_parquet($path)
