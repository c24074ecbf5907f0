"""haflow: highly available Apache Airflow on ordinary Linux machines."""
