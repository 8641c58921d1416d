"""The method, in one sitting: zeroth-order arithmetic (`estimator`), LoRA-FA with perturbation copies
(`lora`), one eager step of P-RGE or MeZO (`step`), answer-token losses (`loss`), lr schedules (`schedule`)."""
