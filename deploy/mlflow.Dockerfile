# MLflow's server image with the PostgreSQL driver and the S3 client its stores need.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary boto3
