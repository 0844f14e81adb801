"""The zoo of backdoored victims: datasets, device-resident loaders, models, attacks, victim
training, the on-disk store and the metrics."""
