-- Integrity of the inputs of one evaluation split, so that a report never runs on a partial or
-- mismatched loss table without saying so. Each first_* column names one offending sample (and
-- the shard file it came from), NULL when there is none.
-- $losses  per-sample loss shards (glob); $manifest, $attributes  the tables; $split  e.g. 'test'
WITH m AS (
    SELECT sample_id, split FROM read_parquet($manifest)
),
l AS (
    SELECT sample_id, split, filename FROM read_parquet($losses, filename = true)
),
a AS (
    SELECT sample_id FROM read_parquet($attributes)
),
dup AS (
    SELECT sample_id, min(filename) AS filename
    FROM l GROUP BY sample_id HAVING count(*) > 1
)
SELECT
    (SELECT count(*) FROM m WHERE split = $split) AS n_manifest,
    (SELECT count(*) FROM l WHERE split = $split) AS n_losses,
    (SELECT count(*) FROM dup) AS n_duplicate_losses,
    (SELECT min(sample_id) FROM dup) AS first_duplicate_loss,
    (SELECT arg_min(filename, sample_id) FROM dup) AS first_duplicate_loss_file,
    (SELECT count(*) FROM l ANTI JOIN m USING (sample_id)) AS n_losses_not_in_manifest,
    (SELECT min(sample_id) FROM l ANTI JOIN m USING (sample_id)) AS first_loss_not_in_manifest,
    (SELECT arg_min(filename, sample_id) FROM l ANTI JOIN m USING (sample_id))
        AS first_loss_not_in_manifest_file,
    (SELECT count(*) FROM l JOIN m USING (sample_id) WHERE l.split <> m.split)
        AS n_split_mismatch,
    (SELECT min(sample_id) FROM l JOIN m USING (sample_id) WHERE l.split <> m.split)
        AS first_split_mismatch,
    (SELECT count(*) FROM m ANTI JOIN l USING (sample_id) WHERE m.split = $split)
        AS n_missing_losses,
    (SELECT min(sample_id) FROM m ANTI JOIN l USING (sample_id) WHERE m.split = $split)
        AS first_missing_loss,
    (SELECT count(*) FROM l ANTI JOIN a USING (sample_id) WHERE l.split = $split)
        AS n_missing_attributes,
    (SELECT min(sample_id) FROM l ANTI JOIN a USING (sample_id) WHERE l.split = $split)
        AS first_missing_attributes
