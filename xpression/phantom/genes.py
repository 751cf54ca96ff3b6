"""Gene panel and per-program expression signatures."""

from __future__ import annotations

from typing import Any

import numpy as np

from .programs import PROGRAMS

MARKERS = {
    "alveolar": ["Sftpc", "Sftpb", "Sftpa1", "Sftpd", "Ager", "Hopx", "Lamp3", "Napsa",
                 "Cldn18", "Aqp5", "Emp2", "Rtkn2"],
    "airway": ["Scgb1a1", "Scgb3a2", "Cyp2f2", "Foxj1", "Tppp3", "Krt5", "Krt15", "Muc5b",
               "Bpifa1", "Cdhr3", "Dynlrb2", "Ccdc153"],
    "vascular": ["Pecam1", "Cdh5", "Cldn5", "Kdr", "Vwf", "Emcn", "Plvap", "Acta2", "Myh11",
                 "Tagln", "Car4", "Aplnr"],
    "infected": ["CoV2-N", "CoV2-S", "CoV2-ORF1ab", "Isg15", "Ifit1", "Ifit3", "Rsad2", "Oas1a",
                 "Irf7", "Cxcl10", "Stat1", "Mx1"],
    "immune": ["Ptprc", "Cd68", "Lyz2", "Cd74", "H2-Ab1", "Cd3e", "Cd8a", "Cd19", "Ms4a1",
               "Itgax", "S100a8", "S100a9"],
    "remodelling": ["Col1a1", "Col1a2", "Col3a1", "Fn1", "Spp1", "Timp1", "Mmp12", "Postn",
                    "Tnc", "Lox", "Acta2-as", "Ctgf"],
}


def make_expression(rng: np.random.Generator, n_genes: int, library_size: float) -> dict[str, Any]:
    """Gene names and a (P, G) signature matrix whose rows sum to 1.

    Every gene has a log-normal background share; each program's markers are boosted
    8-30x in that program only.
    """
    genes = [g for p in PROGRAMS for g in MARKERS[p]]
    genes += [f"Gm{10000 + i}" for i in range(max(0, n_genes - len(genes)))]
    genes = genes[:max(n_genes, len(genes))]
    background = rng.lognormal(0.0, 1.0, len(genes))
    sig = np.tile(background, (len(PROGRAMS), 1))
    for p, name in enumerate(PROGRAMS):
        idx = [genes.index(g) for g in MARKERS[name]]
        sig[p, idx] *= rng.uniform(8.0, 30.0, len(idx))
    sig /= sig.sum(axis=1, keepdims=True)
    return {
        "genes": genes,
        "signatures": sig.round(10).tolist(),
        "library_size": float(library_size),
        "library_sigma": 0.35,  # sd of log library size
        "dispersion": 0.15,  # negative binomial: var = mu + dispersion * mu^2
    }
