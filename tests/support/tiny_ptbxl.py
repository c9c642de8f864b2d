"""A tiny PTB-XL-layout folder for training tests, built from the committed PTB-XL fixture records."""

from __future__ import annotations

from pathlib import Path

WFDB = Path(__file__).resolve().parents[1] / "fixtures" / "wfdb"

PTBXL_COLUMNS = "ecg_id,patient_id,age,sex,height,weight,recording_date,scp_codes,strat_fold,filename_lr,filename_hr"


def write_tiny_ptbxl(
    root: Path, rows: list[tuple[int, int, float | str, int, float | str, float | str, str, int]]
) -> Path:
    """A PTB-XL-layout folder whose signals are copies of the three committed PTB-XL fixture records.

    rows: (ecg_id, patient_id, age, sex, height, weight, scp_codes literal, strat_fold).
    """
    sources = ["00024_lr", "00622_lr", "00730_lr"]
    (root / "records100" / "00000").mkdir(parents=True, exist_ok=True)
    lines = [PTBXL_COLUMNS]
    for i, (ecg_id, pid, age, sex, height, weight, codes, fold) in enumerate(rows):
        name = f"{ecg_id:05d}_lr"
        src = sources[i % 3]
        for ext in ("hea", "dat"):
            text = (WFDB / f"{src}.{ext}").read_bytes()
            if ext == "hea":
                text = text.replace(src.encode(), name.encode())
            (root / "records100" / "00000" / f"{name}.{ext}").write_bytes(text)
        lines.append(
            f'{ecg_id},{pid},{age},{sex},{height},{weight},1990-01-01 10:00:00,"{codes}",{fold},'
            f"records100/00000/{name},"
        )
    (root / "ptbxl_database.csv").write_text("\n".join(lines) + "\n")
    (root / "scp_statements.csv").write_text(
        ",diagnostic,diagnostic_class\nNORM,1,NORM\nASMI,1,MI\nISC_,1,STTC\nCLBBB,1,CD\n1AVB,1,CD\nLVH,1,HYP\nSR,,\n"
    )
    return root
