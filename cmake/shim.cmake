# The guarded flash_attn import shim: three files at the ROOT of site-packages.
#
#   mtlflash_shim.pth       import line run by site.py at start-up (Python <= 3.17)
#   mtlflash_shim.start     PEP 829 entry point (Python >= 3.15; a matching .start makes
#                           site.py skip the .pth import line, so it runs exactly once)
#   _mtlflash_shim_boot.py  copy of python/mtlflash/_shim_boot.py as a top-level module:
#                           the start-up hook must not import the mtlflash package (that
#                           would import torch in every Python process)
#
# scikit-build-core puts every file CMake installs into ${SKBUILD_PLATLIB_DIR} into the
# wheel, for both `pip install .` and `pip install -e .`: its redirect-mode editable wheel
# only redirects the Python package (python/mtlflash), and files installed at the platlib
# root land in site-packages as ordinary copies. So after editing _shim_boot.py, an
# editable install needs a reinstall for the start-up copy to follow (the served modules and
# mtlflash.shim are read live from the source tree).
#
# Outside scikit-build-core (plain cmake --install) the files go to the install prefix.
# Set MTLFLASH_INSTALL_SHIM=OFF to build a wheel without the shim.

option(MTLFLASH_INSTALL_SHIM "Install the flash_attn import shim (.pth/.start at site-packages root)" ON)

if(MTLFLASH_INSTALL_SHIM)
  if(DEFINED SKBUILD_PLATLIB_DIR)
    set(_mf_shim_dest "${SKBUILD_PLATLIB_DIR}")
  else()
    set(_mf_shim_dest ".")
  endif()
  install(FILES
            "${CMAKE_CURRENT_LIST_DIR}/../python/mtlflash_shim.pth"
            "${CMAKE_CURRENT_LIST_DIR}/../python/mtlflash_shim.start"
          DESTINATION "${_mf_shim_dest}")
  install(FILES "${CMAKE_CURRENT_LIST_DIR}/../python/mtlflash/_shim_boot.py"
          DESTINATION "${_mf_shim_dest}"
          RENAME _mtlflash_shim_boot.py)
endif()
