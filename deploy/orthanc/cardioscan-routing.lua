-- Orthanc auto-routing: send scanned ECG pages on to CardioScan as they arrive.
--
-- Register CardioScan in Orthanc's configuration (its AE title, host and DICOM port):
--   "DicomModalities" : { "cardioscan" : [ "CARDIOSCAN", "cardioscan.example.org", 11112 ] }
-- and load this file:  "LuaScripts" : [ "/etc/orthanc/cardioscan-routing.lua" ]
--
-- Secondary Captures, VL Photographic and Encapsulated PDF objects are routed; CR and DX
-- images only when their descriptions say ECG (a scanned ECG filed through an X-ray
-- workstation). The 12-lead ECG waveforms CardioScan stores back are never routed, so
-- nothing loops. CardioScan answers every object with a DICOM status; a page without an
-- ECG is stored there and its job fails with the reason.

local PICTURE_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.7'] = true,       -- Secondary Capture
  ['1.2.840.10008.5.1.4.1.1.7.1'] = true,     -- Multi-frame Single Bit SC
  ['1.2.840.10008.5.1.4.1.1.7.2'] = true,     -- Multi-frame Grayscale Byte SC
  ['1.2.840.10008.5.1.4.1.1.7.3'] = true,     -- Multi-frame Grayscale Word SC
  ['1.2.840.10008.5.1.4.1.1.7.4'] = true,     -- Multi-frame True Color SC
  ['1.2.840.10008.5.1.4.1.1.77.1.4'] = true,  -- VL Photographic
  ['1.2.840.10008.5.1.4.1.1.104.1'] = true,   -- Encapsulated PDF
}

local XRAY_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.1'] = true,       -- Computed Radiography
  ['1.2.840.10008.5.1.4.1.1.1.1'] = true,     -- Digital X-Ray, For Presentation
  ['1.2.840.10008.5.1.4.1.1.1.1.1'] = true,   -- Digital X-Ray, For Processing
  ['1.2.840.10008.5.1.4.1.1.77.1.1'] = true,  -- VL Endoscopic
}

local ECG_WORDS = { 'ECG', 'EKG', 'ELECTROCARDIO' }
local DESCRIPTIONS = { 'StudyDescription', 'SeriesDescription', 'DocumentTitle',
                       'ProtocolName', 'ImageComments' }

local function describedAsEcg(tags)
  for _, key in ipairs(DESCRIPTIONS) do
    local text = string.upper(tags[key] or '')
    for _, word in ipairs(ECG_WORDS) do
      if string.find(text, word, 1, true) then
        return true
      end
    end
  end
  return false
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  local sopClass = tags['SOPClassUID']
  if PICTURE_CLASSES[sopClass] or (XRAY_CLASSES[sopClass] and describedAsEcg(tags)) then
    SendToModality(instanceId, 'cardioscan')
  end
end
