{{- define "cardioscan.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cardioscan.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "cardioscan.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cardioscan.spoolClaim" -}}
{{- if .Values.spool.existingClaim -}}{{ .Values.spool.existingClaim }}{{- else -}}{{ include "cardioscan.fullname" . }}-spool{{- end -}}
{{- end -}}

{{- define "cardioscan.env" -}}
- name: CARDIOSCAN_CONFIG
  value: /etc/cardioscan/config.yaml
- name: CARDIOSCAN_DATA_DIR
  value: /var/lib/cardioscan
- name: CARDIOSCAN_DATABASE_URL
  valueFrom:
    secretKeyRef:
{{- if .Values.postgresql.enabled }}
      name: {{ include "cardioscan.fullname" . }}-db
{{- else }}
      name: {{ required "externalDatabase.existingSecret is required when postgresql.enabled=false" .Values.externalDatabase.existingSecret }}
{{- end }}
      key: url
{{- end -}}

{{- define "cardioscan.volumes" -}}
- name: spool
  persistentVolumeClaim:
    claimName: {{ include "cardioscan.spoolClaim" . }}
- name: config
  configMap:
    name: {{ include "cardioscan.fullname" . }}-config
{{- end -}}

{{- define "cardioscan.volumeMounts" -}}
- name: spool
  mountPath: /var/lib/cardioscan
- name: config
  mountPath: /etc/cardioscan
  readOnly: true
{{- end -}}
