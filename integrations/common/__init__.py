"""What every framework integration shares: Parrot sessions opened against a service (or the
embedded one), calls submitted to a session and waited for with their token counts, and
placeholders that stand for replies not generated yet."""
